"""Calibration: measure how similar each layer's attention is to earlier layers', choose the lazy schedule.

The dense model runs on calibration samples (an image and a prompt each). For every decoder
layer we take the attention rows of a few query tokens (the last token by default, or every
text token), computing softmax(q K^T) only for those rows, and measure the Jensen-Shannon
divergence between layers:

* **GLA**: over the whole row (every key);
* **VLA**: over the image-token keys only, renormalised to sum to 1 (rows that see no image
  token are left out).

Divergences are in nats (natural log, so at most ln 2 ~ 0.693). A layer pair's divergence is
the mean over query heads of the per-head JSD (a lazy layer inherits the pattern head by head,
so that is what it loses), averaged over the selected rows; the JSD of the head-averaged rows is
recorded too. We compute it for every pair of layers, so any would-be anchor can be looked up.

Data (``--data``):

* a JSONL file, one ``{"image": path, "prompt": text}`` object per line (relative image paths
  resolve against the JSONL file's folder); or
* a folder of images (png, jpg, jpeg, bmp, gif, webp, tif, tiff) with a ``prompts.txt``, one
  prompt per line (blank lines skipped): every image is paired with every prompt, image by
  image in file-name order.

Schedule selection (layer 0 and layers below ``keep_first`` are never lazy):

* ``threshold`` EPS: one pass from the bottom; layer l becomes lazy when its divergence to
  layer l-1 *and* to the current block's anchor are both below EPS, otherwise it becomes the
  next anchor. The anchor check stops a long run of small adjacent steps from drifting far from
  the pattern the lazy layers actually inherit.
* ``lazy_fraction`` F: round(F * L) layers, added greedily one at a time, each time the layer
  that raises the schedule's total divergence (sum over lazy layers of the divergence to their
  anchor) the least. With one lazy layer per block this is "the lowest adjacent divergences";
  beyond that it accounts for lazy layers that inherit from an anchor further below.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import io
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._files import write_atomic
from ..errors import QCacheError
from ..images import check_image
from ..lazy.cache import CacheLayout, layout_kv_bytes
from ..lazy.schedule import SCHEDULE_FILE, Schedule, check_mode
from ..runtime.buckets import bucket
from ..runtime.forward import attention_probe
from .jsonl import json_lines, read_text

ROWS = ("last", "text")
PROMPTS_FILE = "prompts.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_LAZY_FRACTION = 0.5  # used when neither a threshold nor a fraction is given
# The prompt shape for which the KV saving is reported: one image, 64 text tokens, 64 new tokens.
TEXT_TOKENS, NEW_TOKENS = 64, 64
DIVERGENCE_UNIT = "Jensen-Shannon divergence in nats (natural log), mean over query heads of per-head JSD"


# -- data ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """One calibration input: an image, a prompt, and where it was listed (for error messages)."""

    image: Path
    prompt: str
    source: str


def load_samples(data_path, max_samples: int | None = None) -> list[Sample]:
    """The calibration samples of a JSONL file or an image folder (see the module docstring).

    Every image is checked to exist and be readable before anything runs. Raises QCacheError for a
    missing path, a malformed file, a bad image or an empty data set.
    """
    path = Path(data_path).expanduser()
    if not path.exists():
        raise QCacheError(f"{data_path}: calibration data not found")
    samples = _folder_samples(path) if path.is_dir() else _jsonl_samples(path)
    if max_samples is not None:
        samples = samples[:max_samples]
    if not samples:
        raise QCacheError(f"{data_path}: the calibration data set is empty (no samples)")
    for s in samples:
        check_image(s.image, s.source)
    return samples


def _folder_samples(folder: Path) -> list[Sample]:
    prompts_file = folder / PROMPTS_FILE
    if not prompts_file.is_file():
        raise QCacheError(f"{folder}: no {PROMPTS_FILE} (one prompt per line) beside the images")
    prompts = [line.strip() for line in _read_text(prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise QCacheError(f"{prompts_file}: the calibration data set is empty (no prompts)")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise QCacheError(f"{folder}: the calibration data set is empty (no {', '.join(IMAGE_SUFFIXES)} images)")
    return [Sample(im, prompt, str(folder)) for im in images for prompt in prompts]


def _jsonl_samples(path: Path) -> list[Sample]:
    samples = []
    for where, obj in json_lines(path, _read_text(path)):
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("prompt"), str):
            raise QCacheError(f'{where}: expected an object {{"image": path, "prompt": text}}')
        samples.append(Sample(path.parent / Path(obj["image"]).expanduser(), obj["prompt"], where))
    return samples


def _read_text(path: Path) -> str:
    return read_text(path, f"JSONL, or a folder with {PROMPTS_FILE}")


# -- divergences -----------------------------------------------------------------------------


def js_divergence(p, q, axis: int = -1):
    """Jensen-Shannon divergence in nats between distributions ``p`` and ``q`` along ``axis``.

    Equals ``scipy.spatial.distance.jensenshannon(p, q) ** 2`` (natural log). Zeros are fine.
    """
    m = 0.5 * (p + q)
    rel = jax.scipy.special.rel_entr
    return 0.5 * (rel(p, m).sum(axis) + rel(q, m).sum(axis))


def _row_mean(x, weight):
    """Weighted mean over the row axis (axis 1) of x [L, R, ...]."""
    return jnp.einsum("r,lr...->l...", weight, x) / jnp.maximum(weight.sum(), 1.0)


def _pairwise(p, weight):
    """JSD between every pair of layers for rows p [L, R, Hq, T]: per head [L, L, Hq] and of the
    head-averaged rows [L, L], each a weighted mean over rows. One layer at a time (lax.map), so
    memory stays at one [L, R, Hq, T] comparison."""
    averaged = p.mean(2)

    def against(i):
        heads = js_divergence(p[i][None], p)
        return _row_mean(heads, weight), _row_mean(js_divergence(averaged[i][None], averaged), weight)

    heads, avg = jax.lax.map(against, jnp.arange(p.shape[0]))
    return {"heads": heads, "averaged": avg}


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _sample_divergences(graphdef, params, input_ids, pixel_values, valid, rows, weight, mesh=None, rope_positions=None):
    """{"gla": whole rows, "vla": image part renormalised} -> pairwise JSD for one sample (B=1).
    ``mesh``: the model's device mesh (attention per shard), or None; ``rope_positions``: the
    family's (Qwen2-VL's M-RoPE), or None."""
    model = nnx.merge(graphdef, params)
    probs = attention_probe(model, input_ids, pixel_values, valid, rows, mesh=mesh,
                            rope_positions=rope_positions)[:, 0].transpose(0, 2, 1, 3)
    vis = input_ids[0] == model.cfg.image_token_id
    image = jnp.where(vis, probs, 0.0)
    mass = image.sum(-1, keepdims=True)
    image = image / jnp.where(mass > 0, mass, 1.0)
    sees_image = jnp.any(vis & (jnp.arange(vis.shape[0]) <= rows[:, None]), axis=-1)
    return {"gla": _pairwise(probs, weight), "vla": _pairwise(image, weight * sees_image)}


def _padded_inputs(ids: list[int], image_token_id: int, rows: str):
    """(input_ids [1, T'], valid [1, T'], row indices [R'], row weights [R']) with T' and R' bucketed
    to powers of two so that prompts of similar length share one compilation. Padding goes on the
    right, after every real token, so no real row can see it (causal mask); padded rows weigh 0."""
    t = len(ids)
    pad_id = 1 if image_token_id == 0 else 0
    input_ids = np.full((1, bucket(t)), pad_id, np.int32)
    input_ids[0, :t] = ids
    valid = np.arange(input_ids.shape[1])[None] < t
    idx = [t - 1] if rows == "last" else [i for i, tok in enumerate(ids) if tok != image_token_id]
    row_idx = np.zeros(bucket(len(idx), 1), np.int32)
    row_idx[: len(idx)] = idx
    weight = (np.arange(row_idx.shape[0]) < len(idx)).astype(np.float32)
    return input_ids, valid, row_idx, weight


@dataclasses.dataclass
class Divergence:
    """JSD (nats) between every pair of layers, per sample, for one part of the rows.

    ``heads`` [N, L, L, Hq]: per-head JSD; ``averaged`` [N, L, L]: JSD of the head-averaged
    rows. ``pairwise`` (per-head JSD averaged over heads) is what the schedule is chosen from.
    """

    heads: np.ndarray
    averaged: np.ndarray

    @property
    def pairwise(self) -> np.ndarray:
        return self.heads.mean(-1)

    def versus(self, refs: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std over samples of the divergence of layer l to layer ``refs[l]`` ([L] each,
        NaN where ``refs[l]`` is None)."""
        d = self.pairwise
        stats = [(np.nan, np.nan) if r is None else (d[:, l, r].mean(), d[:, l, r].std()) for l, r in enumerate(refs)]
        mean, std = np.array(stats, dtype=np.float64).T
        return mean, std


def adjacent_refs(num_layers: int) -> list[int | None]:
    """The layer each layer is compared with for the adjacent divergence: l-1 (none for layer 0)."""
    return [None] + list(range(num_layers - 1))


def collect_divergences(
    model, samples: Sequence[Sample], *, rows: str = "last", progress: bool = True, visual_tokens: list | None = None
) -> dict[str, Divergence]:
    """Run the dense ``model`` (a QCacheModel) on ``samples``; {"gla", "vla"} -> :class:`Divergence`.
    ``visual_tokens``: a list that receives each sample's visual-token count."""
    from tqdm.auto import tqdm

    image_token_id = model.config.image_token_id
    per_sample, visual = [], []
    for s in tqdm(samples, desc="calibrating", unit="sample", disable=not progress):
        ids, pixel_values, *meta = model.encode(s.prompt, [s.image])  # LLaVA-NeXT, Qwen2-VL: + sizes / grids
        input_ids, valid, row_idx, weight = _padded_inputs(ids, image_token_id, rows)
        visual.append(sum(1 for t in ids if t == image_token_id))
        pixels, rope = model.model_images(input_ids, valid, pixel_values, *meta)
        out = _sample_divergences(model.graphdef, model.params, input_ids, pixels, valid, row_idx, weight,
                                  mesh=getattr(model, "mesh", None), rope_positions=rope)
        per_sample.append(jax.device_get(out))
    if visual_tokens is not None:
        visual_tokens.extend(visual)
    return {
        part: Divergence(*(np.stack([d[part][k] for d in per_sample]) for k in ("heads", "averaged")))
        for part in ("gla", "vla")
    }


# -- schedule selection ----------------------------------------------------------------------


def select_by_threshold(pairwise: np.ndarray, eps: float, keep_first: int = 1, mode: str = "vla") -> Schedule:
    """Schedule from mean pairwise divergences [L, L]: a bottom-up pass where layer l is lazy iff its
    divergence to l-1 and to the current anchor are both below ``eps``."""
    n = pairwise.shape[0]
    lazy, anchor = [False] * n, 0
    for l in range(1, n):
        if l >= keep_first and pairwise[l, l - 1] < eps and pairwise[l, anchor] < eps:
            lazy[l] = True
        else:
            anchor = l
    return Schedule(tuple(lazy), mode)


def schedule_cost(pairwise: np.ndarray, lazy: Sequence[bool]) -> float:
    """Sum over lazy layers of the divergence to their anchor (what the schedule gives up)."""
    s = Schedule(tuple(lazy))
    return float(sum(pairwise[l, s.anchor(l)] for l in s.lazy_layers))


def select_by_fraction(pairwise: np.ndarray, fraction: float, keep_first: int = 1, mode: str = "vla") -> Schedule:
    """Schedule with round(fraction * L) lazy layers, added greedily by least increase of
    :func:`schedule_cost` (ties: lowest layer)."""
    n = pairwise.shape[0]
    candidates = range(max(1, keep_first), n)
    target = round(fraction * n)
    if target > len(candidates):
        raise QCacheError(
            f"lazy fraction {fraction} asks for {target} lazy layers, but only {len(candidates)} of {n} may be lazy "
            f"(layer 0 and the first {max(1, keep_first)} layer(s) stay dense)"
        )
    lazy = [False] * n
    for _ in range(target):
        best = min(
            (l for l in candidates if not lazy[l]),
            key=lambda l: (schedule_cost(pairwise, lazy[:l] + [True] + lazy[l + 1 :]), l),
        )
        lazy[best] = True
    return Schedule(tuple(lazy), mode)


# -- result, outputs -------------------------------------------------------------------------


def kv_saving(
    schedule: Schedule, config, *, text_tokens: int = TEXT_TOKENS, new_tokens: int = NEW_TOKENS,
    image_tokens: int | None = None,
) -> dict:
    """Fraction of the dense KV cache the schedule saves for one image plus ``text_tokens`` prompt
    and ``new_tokens`` generated tokens, from the real cache layout's array shapes (not allocated).
    ``image_tokens``: the image's visual tokens (default: one image of a fixed-size family; the
    calibration samples' mean where an image's count depends on its size)."""
    image_tokens = config.image_tokens_per_image if image_tokens is None else int(image_tokens)
    layout = CacheLayout(batch=1, image_len=image_tokens, text_len=text_tokens + new_tokens, schedule=schedule)
    kv, dense = layout_kv_bytes(layout, config.text, config.dtype)
    return {
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "new_tokens": new_tokens,
        "fraction": 1.0 - kv / dense,
    }


def _json_floats(x: np.ndarray) -> list:
    """Floats for JSON, None for NaN (JSON has no NaN)."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(x, np.float64).tolist()]


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` measured and chose.

    ``divergence``: {"gla": whole rows, "vla": image part} -> :class:`Divergence` (both are
    measured; ``mode`` picks the one the schedule uses). ``schedule``: the chosen :class:`Schedule`.
    ``kv_saving``: the prompt shape and the fraction of the dense KV cache saved.
    """

    checkpoint: str
    samples: int
    mode: str
    rows: str
    keep_first: int
    threshold: float | None
    lazy_fraction: float | None
    divergence: dict
    schedule: Schedule
    kv_saving: dict
    date: str
    schedule_path: Path | None = None
    plot_path: Path | None = None

    @property
    def num_layers(self) -> int:
        return self.schedule.num_layers

    @property
    def lazy_layers(self) -> list[int]:
        return self.schedule.lazy_layers

    def per_layer(self) -> dict:
        """Per-layer statistics (the schedule's mode), as lists of length L; None for layer 0."""
        div, n = self.divergence[self.mode], self.num_layers
        adj_mean, adj_std = div.versus(adjacent_refs(n))
        refs = self.schedule.would_be_anchors()
        anc_mean, anc_std = div.versus(refs)
        heads = div.heads.mean(0)
        averaged = div.averaged.mean(0)
        return {
            "adjacent_jsd_mean": _json_floats(adj_mean),
            "adjacent_jsd_std": _json_floats(adj_std),
            "anchor": refs,
            "anchor_jsd_mean": _json_floats(anc_mean),
            "anchor_jsd_std": _json_floats(anc_std),
            "adjacent_jsd_per_head_mean": [None] + [_json_floats(heads[l, l - 1]) for l in range(1, n)],
            "adjacent_jsd_head_averaged_rows_mean": [None] + [float(averaged[l, l - 1]) for l in range(1, n)],
        }

    def details(self) -> dict:
        """What the schedule JSON records beside the schedule: the rule, the per-layer
        divergences, the KV saving and where they come from."""
        rule = {"threshold": self.threshold} if self.threshold is not None else {"lazy_fraction": self.lazy_fraction}
        return {
            "calibration": {
                **rule,
                "keep_first": self.keep_first,
                "rows": self.rows,
                "divergence": DIVERGENCE_UNIT,
                "per_layer": self.per_layer(),
                "kv_saving": self.kv_saving,
                "checkpoint": self.checkpoint,
                "date": self.date,
                "samples": self.samples,
            }
        }

    def to_json(self) -> dict:
        """The schedule JSON (what ``--lazy auto`` reads), in :meth:`Schedule.to_json`'s format."""
        return self.schedule.to_json(**self.details())


def format_table(result: CalibrationResult) -> str:
    """A text table: layer, adjacent JSD mean ± std, would-be anchor and its JSD, lazy?"""
    stats = result.per_layer()
    lines = [f"{'layer':>5}  {'adjacent JSD':>21}  {'anchor':>6}  {'anchor JSD':>21}  lazy"]
    for l in range(result.num_layers):
        if l == 0:
            lines.append(f"{0:>5}  {'-':>21}  {'-':>6}  {'-':>21}")
            continue
        adj = f"{stats['adjacent_jsd_mean'][l]:.2e} ± {stats['adjacent_jsd_std'][l]:.2e}"
        anc = f"{stats['anchor_jsd_mean'][l]:.2e} ± {stats['anchor_jsd_std'][l]:.2e}"
        lines.append(f"{l:>5}  {adj:>21}  {stats['anchor'][l]:>6}  {anc:>21}  {'yes' if result.schedule.lazy[l] else ''}")
    return "\n".join(lines)


def summary(result: CalibrationResult) -> str:
    """One line: the chosen lazy layers and the KV cache they save for the stated prompt shape."""
    kv = result.kv_saving
    return (
        f"lazy layers {result.schedule.describe()} ({len(result.lazy_layers)}/{result.num_layers}); "
        f"KV cache saved for {kv['image_tokens']} image + {kv['text_tokens']} text + {kv['new_tokens']} new tokens: "
        f"{kv['fraction']:.1%}"
    )


def _import_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise QCacheError("the calibration plot needs matplotlib (pip install matplotlib)") from None
    return Figure


def render_plot(result: CalibrationResult) -> bytes:
    """PNG bytes: per-layer divergence to l-1 and to the would-be anchor (error bars: std over
    samples), lazy layers shaded, the threshold as a line."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    fig = _import_figure()(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    stats = result.per_layer()
    layers = np.arange(1, result.num_layers)

    def series(key):
        return np.array(stats[key][1:], np.float64)

    ax.errorbar(
        layers,
        series("adjacent_jsd_mean"),
        yerr=series("adjacent_jsd_std"),
        fmt="o-",
        capsize=3,
        label="vs previous layer",
    )
    # Shifted a little so that the two series' error bars do not hide each other.
    ax.errorbar(
        layers + 0.1,
        series("anchor_jsd_mean"),
        yerr=series("anchor_jsd_std"),
        fmt="s",
        capsize=3,
        alpha=0.7,
        label="vs (would-be) anchor",
    )
    for i, (first, last) in enumerate((ls[0], ls[-1]) for _, ls in result.schedule.blocks):
        ax.axvspan(first - 0.5, last + 0.5, color="tab:green", alpha=0.15, label="lazy layers" if i == 0 else None)
    if result.threshold is not None:
        ax.axhline(
            result.threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {result.threshold:g}"
        )
    part = "image keys, renormalised" if result.mode == "vla" else "all keys"
    rows = "last-token rows" if result.rows == "last" else "all text-token rows"
    ax.set_title(
        f"{Path(result.checkpoint).name}: {result.mode.upper()} ({part}), {rows}, {result.samples} samples\n"
        f"lazy {result.schedule.describe()}; KV cache saved: {result.kv_saving['fraction']:.1%}",
        fontsize=10,
    )
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("JS divergence (nats)")
    ax.set_xticks(range(result.num_layers))
    ax.set_xlim(-0.5, result.num_layers - 0.5)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


# -- the entry point -------------------------------------------------------------------------


def _check_options(threshold, lazy_fraction, keep_first, mode, rows, max_samples):
    if threshold is not None and lazy_fraction is not None:
        raise QCacheError("give either a threshold or a lazy fraction, not both")
    if threshold is not None and not threshold > 0:
        raise QCacheError(f"threshold must be > 0, got {threshold}")
    if lazy_fraction is not None and not 0 <= lazy_fraction < 1:
        raise QCacheError(f"lazy fraction must be in [0, 1), got {lazy_fraction}")
    if keep_first < 0:
        raise QCacheError(f"keep_first must be >= 0, got {keep_first}")
    check_mode(mode)
    if rows not in ROWS:
        raise QCacheError(f"unknown rows {rows!r}; expected one of {', '.join(ROWS)}")
    if max_samples is not None and max_samples < 1:
        raise QCacheError(f"max_samples must be >= 1, got {max_samples}")


def calibrate(
    model_or_ckpt_dir,
    data_path,
    *,
    threshold: float | None = None,
    lazy_fraction: float | None = None,
    keep_first: int = 1,
    mode: str = "vla",
    rows: str = "last",
    max_samples: int | None = None,
    out=None,
    plot=None,
    progress: bool = True,
) -> CalibrationResult:
    """Measure layer-to-layer attention divergence on ``data_path`` and choose a lazy schedule.

    ``model_or_ckpt_dir``: a :class:`~qcache_jax.api.QCacheModel` or a checkpoint directory.
    ``threshold`` EPS or ``lazy_fraction`` F picks the schedule (neither: F = 0.5); layers below
    ``keep_first`` (and layer 0) stay dense. ``mode`` ``vla`` uses the image part of the rows,
    ``gla`` the whole rows; ``rows`` ``last`` (the last prompt token) or ``text`` (every text
    token). Writes the schedule JSON to ``out`` (default: ``CKPT/schedule.json``, which
    ``lazy="auto"`` reads) and, when ``plot`` is a path, a PNG there. Nothing is written unless
    every step succeeded.
    """
    from ..api import QCacheModel, load

    _check_options(threshold, lazy_fraction, keep_first, mode, rows, max_samples)
    if threshold is None and lazy_fraction is None:
        lazy_fraction = DEFAULT_LAZY_FRACTION
    model = model_or_ckpt_dir if isinstance(model_or_ckpt_dir, QCacheModel) else load(model_or_ckpt_dir)
    model.check_schedule(Schedule.dense(model.num_layers))  # the probe is dense: a pruned checkpoint cannot run it
    if out is None:
        if model.path is None:
            raise QCacheError("the model has no checkpoint directory; give out=PATH for the schedule")
        out = model.path / SCHEDULE_FILE
    if plot is not None:
        _import_figure()  # fail now, not after the run
    samples = load_samples(data_path, max_samples)

    visual: list[int] = []  # each sample's visual tokens (Qwen2-VL: they depend on the image's size)
    divergence = collect_divergences(model, samples, rows=rows, progress=progress, visual_tokens=visual)
    mean = divergence[mode].pairwise.mean(0)
    if threshold is not None:
        schedule = select_by_threshold(mean, threshold, keep_first, mode)
    else:
        schedule = select_by_fraction(mean, lazy_fraction, keep_first, mode)
    result = CalibrationResult(
        checkpoint=str(model.path.resolve()) if model.path is not None else "",
        samples=len(samples),
        mode=mode,
        rows=rows,
        keep_first=keep_first,
        threshold=threshold,
        lazy_fraction=lazy_fraction,
        divergence=divergence,
        schedule=schedule,
        kv_saving=kv_saving(schedule, model.config, image_tokens=round(float(np.mean(visual)))),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if plot is not None:
        write_atomic(Path(plot), render_plot(result))
        result.plot_path = Path(plot)
    # The schedule last: it is what `--lazy auto` acts on, so it appears only once all else succeeded.
    schedule.write(Path(out), **result.details())
    result.schedule_path = Path(out)
    return result
