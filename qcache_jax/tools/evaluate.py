"""Visual QA accuracy of a checkpoint on a JSONL file, with dense, GLA or VLA attention.

The file format (one JSON object per line, blank lines skipped)::

    {"image": "images/00001.png", "question": "what color is the shape ?", "answer": "red"}

``image`` is a path (relative paths resolve against the JSONL file's folder); extra keys (such as
``kind``, used to report per-kind accuracy) are allowed. Every line and image is checked before
anything runs; problems raise :class:`~qcache_jax.errors.QCacheError` naming the file and line.

Scoring: batched greedy generation through the chat template (the same path as
``qcache generate``), then exact match after normalisation (lowercase, whitespace collapsed,
punctuation stripped). The yes/no accuracy covers the lines whose answer is ``yes`` or ``no``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from ..errors import QCacheError
from ..images import check_image
from .jsonl import json_lines, read_text
from ..lazy.schedule import format_layers
from .vqa import Example, normalize_answer

FIELDS = ("image", "question", "answer")


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of an evaluation JSONL: the image file, the question and its reference answer."""

    image: Path
    question: str
    answer: str
    kind: str | None
    source: str  # "file:line", for error messages


def load_records(path) -> list[Record]:
    """The checked lines of an evaluation JSONL file (images exist and are readable)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise QCacheError(f"{path}: evaluation file not found")
    if p.is_dir():
        raise QCacheError(f'{path}: is a directory; expected a JSONL file of {{"image", "question", "answer"}} lines')
    records = []
    for where, obj in json_lines(path, read_text(p, "JSONL")):
        if not isinstance(obj, dict):
            raise QCacheError(f'{where}: expected a JSON object {{"image": path, "question": text, "answer": text}}')
        for field in FIELDS:
            if field not in obj:
                raise QCacheError(f"{where}: missing field {field!r} (each line needs {', '.join(FIELDS)})")
            if not isinstance(obj[field], str) or (field != "answer" and not obj[field].strip()):
                raise QCacheError(f"{where}: field {field!r} must be a non-empty string")
        kind = obj.get("kind")
        records.append(
            Record(
                p.parent / Path(obj["image"]).expanduser(),
                obj["question"],
                obj["answer"],
                kind if isinstance(kind, str) else None,
                where,
            )
        )
    if not records:
        raise QCacheError(f"{path}: no examples (empty file)")
    for r in records:
        check_image(r.image, r.source)
    return records


def load_examples(path) -> list[Example]:
    """The file's lines as :class:`~qcache_jax.tools.vqa.Example` objects (images opened), for training."""
    from PIL import Image

    out = []
    for r in load_records(path):
        with Image.open(r.image) as im:
            image = im.convert("RGB")
        out.append(Example(image, r.question, r.answer, r.kind or "", {}))
    return out


@dataclasses.dataclass
class EvalResult:
    """Accuracy (exact match), yes/no accuracy (None without yes/no lines), per-kind accuracy,
    the predictions, and the generation statistics of the run."""

    n: int
    correct: int
    accuracy: float
    yes_no_n: int
    yes_no_accuracy: float | None
    per_kind: dict
    lazy_layers: list
    mode: str
    kv_cache_bytes: int
    dense_kv_cache_bytes: int
    decode_tokens_per_second: float
    seconds: float
    predictions: list = dataclasses.field(repr=False, default_factory=list)
    fastv: str | None = None  # "K:R" when FastV pruned visual tokens

    @property
    def kv_saved_fraction(self) -> float:
        return 1.0 - self.kv_cache_bytes / self.dense_kv_cache_bytes if self.dense_kv_cache_bytes else 0.0

    def to_json(self, with_predictions: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_predictions:
            d.pop("predictions")
        d["kv_saved_fraction"] = self.kv_saved_fraction
        return d


def evaluate(
    model,
    jsonl,
    lazy=None,
    mode: str | None = None,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    limit: int | None = None,
    progress: bool = False,
    fastv_layer: int | None = None,
    fastv_keep: float = 0.5,
) -> EvalResult:
    """Exact-match accuracy of ``model`` (a :class:`~qcache_jax.api.QCacheModel` or a checkpoint
    directory) on ``jsonl`` with the schedule ``lazy`` (any SPEC form; None = dense) in ``mode``
    (None: the mode a schedule file records, else ``vla``). ``fastv_layer`` / ``fastv_keep``:
    FastV on top (:class:`~qcache_jax.api.GenerateOptions`); the reported schedule is the one
    that ran (cut at FastV's layer).

    Greedy, batched generation of at most ``max_new_tokens`` tokens per answer; every batch is
    padded to ``batch_size`` rows so one compiled executable serves the whole file.
    """
    from tqdm.auto import tqdm

    from ..api import QCacheModel, load

    if batch_size < 1:
        raise QCacheError(f"batch size must be >= 1, got {batch_size}")
    records = load_records(jsonl)
    if limit is not None:
        records = records[:limit]
    if not isinstance(model, QCacheModel):
        model = load(model)
    if model.processor is None:
        raise QCacheError(f"{model.path}: checkpoint has no image processor; it cannot answer questions about images")
    fastv = model.resolve_fastv(fastv_layer, fastv_keep)
    schedule = model.effective_schedule(lazy, mode, fastv)
    preds, kv, dense_kv, tokens, decode_s = [], 0, 0, 0, 0.0
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch", disable=not progress):
        chunk = records[i : i + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # same bucket for every batch
        res = model.generate(
            [r.question for r in rows],
            [[str(r.image)] for r in rows],
            lazy=schedule,
            max_new_tokens=max_new_tokens,
            fastv_layer=fastv_layer,
            fastv_keep=fastv_keep,
        )
        preds.extend(res.text[: len(chunk)])
        kv, dense_kv = res.kv_cache_bytes, res.dense_kv_cache_bytes
        n_dec = sum(max(len(t) - 1, 0) for t in res.token_ids)
        tokens += n_dec
        decode_s += n_dec / res.decode_tokens_per_second if res.decode_tokens_per_second else 0.0
    seconds = time.perf_counter() - t0
    hits = [normalize_answer(p) == normalize_answer(r.answer) for p, r in zip(preds, records)]
    yn = [h for h, r in zip(hits, records) if normalize_answer(r.answer) in ("yes", "no")]
    kinds: dict = {}
    for h, r in zip(hits, records):
        if r.kind:
            kinds.setdefault(r.kind, []).append(h)
    return EvalResult(
        n=len(records),
        correct=int(sum(hits)),
        accuracy=sum(hits) / len(records),
        yes_no_n=len(yn),
        yes_no_accuracy=(sum(yn) / len(yn)) if yn else None,
        per_kind={k: sum(v) / len(v) for k, v in sorted(kinds.items())},
        lazy_layers=schedule.lazy_layers,
        mode=schedule.label,
        kv_cache_bytes=kv,
        dense_kv_cache_bytes=dense_kv,
        decode_tokens_per_second=tokens / decode_s if decode_s > 0 else 0.0,
        seconds=seconds,
        fastv=fastv.describe() if fastv is not None else None,
        predictions=[
            {"question": r.question, "answer": r.answer, "prediction": p, "correct": h}
            for r, p, h in zip(records, preds, hits)
        ],
    )


def format_result(res: EvalResult, label: str = "") -> str:
    """The one-paragraph human summary ``qcache eval`` prints (accuracy, per kind, KV, speed)."""
    yn = f", yes/no {res.yes_no_accuracy:.3f} ({res.yes_no_n})" if res.yes_no_accuracy is not None else ""
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in res.per_kind.items())
    lazy = format_layers(res.lazy_layers) + f" ({res.mode})" + (f" | FastV {res.fastv}" if res.fastv else "")
    return (
        f"{label}accuracy {res.accuracy:.4f} ({res.correct}/{res.n}){yn}"
        + (f" [{kinds}]" if kinds else "")
        + f" | lazy layers {lazy} | KV cache saved {100 * res.kv_saved_fraction:.1f}% | {res.seconds:.1f} s"
    )


# -- teacher-forced, packed evaluation -------------------------------------------------------------


def packed_exact_match(graphdef, params, encoder, groups, layout, schedule, *, rows: int = 32,
                       progress: bool = False, fastv=None) -> list[bool]:
    """Exact match of every question in ``groups`` (image, questions) with ``schedule`` (a
    :class:`~qcache_jax.lazy.schedule.Schedule`): one full-sequence pass per packed batch of
    ``rows`` images, the head only at the scored positions. Teacher-forced exact match (every
    answer token and the EOS are the argmax) is what greedy generation answers; tests check
    both agree. Returns one bool per question, in ``groups`` order.

    ``fastv`` (:class:`~qcache_jax.lazy.fastv.FastV`): FastV on top; it needs one question per
    row (``layout.slots == 1``) and ``schedule`` already cut at its layer
    (``QCacheModel.effective_schedule``)."""
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    if fastv is not None and (layout.slots != 1 or fastv.cut(schedule) != schedule):
        raise QCacheError("FastV scoring needs one question per row and a schedule cut at its layer")
    lazy = None if schedule.is_dense else jnp.asarray(schedule.mask)
    step = _packed_eval_step(graphdef, schedule.mode, fastv)
    hits = []
    for i in tqdm(range(0, len(groups), rows), desc="eval", unit="batch", disable=not progress):
        chunk = list(groups[i : i + rows])
        n = len(chunk)
        chunk += [chunk[-1]] * (rows - n)  # one shape for every batch: one compilation
        b = {k: jnp.asarray(v) for k, v in encoder.batch(chunk, layout).items()}
        hit = np.asarray(step(params, b, lazy))
        for r, (_, qs) in enumerate(chunk[:n]):
            hits.extend(bool(h) for h in hit[r, : len(qs)])
    return hits


@functools.lru_cache(maxsize=8)
def _packed_eval_step(graphdef, mode: str, fastv=None):
    import jax

    from .scoring import answer_logits, answer_stats

    @jax.jit
    def step(params, batch, lazy):
        return answer_stats(answer_logits(graphdef, params, batch, lazy, mode=mode, impl="xla", fastv=fastv), batch)[1]

    return step


def perplexity(model, text: str, *, lazy=None, mode: str | None = None, window: int = 512) -> float:
    """exp(mean next-token NLL) of ``text`` under ``model`` (a QCacheModel) with a schedule, over
    consecutive windows of ``window`` tokens (each scored from its own start)."""
    import jax
    import numpy as np

    ids = model.tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise QCacheError("the text is too short to score")
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = np.array([ids[start : start + window + 1]])
        if chunk.shape[1] < 2:
            break
        logp = np.asarray(jax.nn.log_softmax(model.logits(chunk[:, :-1], lazy=lazy, mode=mode)[0], axis=-1))
        nll -= float(np.take_along_axis(logp, chunk[0, 1:, None], -1).sum())
        count += chunk.shape[1] - 1
    return float(np.exp(nll / count))
