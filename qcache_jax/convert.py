"""Hugging Face PyTorch LLaVA checkpoint -> this project's Orbax checkpoint.

Driven by the abstract parameter tree of :class:`~qcache_jax.model.Llava`: every parameter
names the HF tensor(s) it comes from; per-layer tensors are stacked on the scan axis. Strict:
one error lists every missing, unexpected and misshapen tensor. The output is written to a
temporary directory beside ``out`` and renamed at the end, so a failure or Ctrl-C leaves
nothing at ``out``.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .checkpoint import atomic_output_dir, copy_hf_side_files, save_checkpoint
from .config import LlavaConfig, from_hf_config
from .errors import QCacheError

DTYPES = ("float32", "bfloat16", "float16")
# Buffers that transformers recomputes at load time; old checkpoints still carry them.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")
# The three key layouts seen in the wild, mapped onto one canonical form.
_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
)
# Stacked groups: our path prefix -> HF's per-layer key prefix.
_STACKS = {
    ("language_model", "layers"): "language_model.layers",
    ("vision_tower", "encoder", "layers"): "vision_tower.encoder.layers",
}


def canonical_name(key: str) -> str:
    """Map an HF tensor name from any supported layout to the canonical one."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def hf_name(path: tuple[str, ...]) -> tuple[str, str | None, str]:
    """(HF canonical name with ``{i}`` for the layer, stacked-group or None, transform) for a param path."""
    stack = None
    for prefix, hf_prefix in _STACKS.items():
        if path[: len(prefix)] == prefix:
            stack, path = hf_prefix + ".{i}", path[len(prefix) :]
            break
    *mods, leaf = path
    base = ".".join(mods)
    if leaf == "kernel":
        name, transform = f"{base}.weight", "linear"
    elif leaf in ("scale", "embedding"):
        name, transform = f"{base}.weight", "copy"
    elif leaf == "patch_embedding":
        name, transform = f"{base}.patch_embedding.weight", "conv"
    else:
        name, transform = f"{base}.{leaf}" if base else leaf, "copy"
    if stack is not None:
        name = f"{stack}.{name}"
    return name, stack, transform


def _to_flax(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return x.T
    if transform == "conv":  # OIHW -> HWIO
        return x.transpose(2, 3, 1, 0)
    return x


def _flax_shape(hf_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "linear" and len(hf_shape) == 2:
        return hf_shape[::-1]
    if transform == "conv" and len(hf_shape) == 4:
        return (hf_shape[2], hf_shape[3], hf_shape[1], hf_shape[0])
    return tuple(hf_shape)


def abstract_params(cfg: LlavaConfig):
    """(graphdef, pure dict of ShapeDtypeStruct) of the model, without allocating anything."""
    from .model import Llava

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def load_hf_config(src: Path, dtype: str) -> tuple[LlavaConfig, object]:
    from transformers import AutoConfig

    if not (src / "config.json").exists():
        raise QCacheError(f"{src}: no config.json (not a Hugging Face model directory)")
    try:
        hf = AutoConfig.from_pretrained(str(src))
    except (ValueError, KeyError, TypeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QCacheError(f"{src}/config.json: cannot be read as a transformers config ({msg})") from None
    return from_hf_config(hf, dtype=dtype), hf


def convert_params(src: Path, cfg: LlavaConfig, *, progress: bool = True) -> dict:
    """The parameter pytree (nested dict of numpy arrays in ``cfg.dtype``) read from ``src``."""
    from .tensors import TensorSource

    source = TensorSource(src)
    names = {canonical_name(k): k for k in source.keys()}
    _, abstract = abstract_params(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    dtype = np.dtype(cfg.dtype) if cfg.dtype != "bfloat16" else np.dtype(jax.numpy.bfloat16)
    n_layers = {"language_model.layers": cfg.text.num_layers, "vision_tower.encoder.layers": cfg.vision.num_layers}

    consumed, missing, misshapen, out = set(), [], [], {}
    for kp, spec in tqdm(leaves, desc="converting", unit="tensor", disable=not progress):
        path = tuple(str(getattr(k, "key", k)) for k in kp)
        name, stack, transform = hf_name(path)
        if stack is None:
            wanted = [name]
        else:
            wanted = [name.format(i=i) for i in range(n_layers[stack.split(".{i}")[0]])]
        arr = np.empty(spec.shape, dtype)
        ok = True
        for i, w in enumerate(wanted):
            if w not in names:
                missing.append(w)
                ok = False
                continue
            consumed.add(w)
            got = _flax_shape(source.shape(names[w]), transform)
            expect = spec.shape[1:] if stack is not None else spec.shape
            if got != tuple(expect):
                misshapen.append(f"{names[w]} (got {source.shape(names[w])}, expected {_hf_shape(expect, transform)})")
                ok = False
                continue
            # Cast tensor by tensor: peak host memory stays near one copy of the model.
            value = _to_flax(source.get(names[w]), transform).astype(dtype)
            if stack is None:
                arr[...] = value
            else:
                arr[i] = value
        if ok:
            _set(out, path, arr)
    if cfg.text.tie_word_embeddings:
        consumed.add("lm_head.weight")  # a tied head may be saved as a copy of the embeddings
    unexpected = sorted(names[k] for k in names if k not in consumed and not _IGNORED.search(k))
    if missing or unexpected or misshapen:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise QCacheError(f"{src}: checkpoint does not match the model config; " + "; ".join(parts))
    return out


def _hf_shape(flax_shape, transform):
    if transform == "linear" and len(flax_shape) == 2:
        return tuple(flax_shape[::-1])
    if transform == "conv":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(flax_shape)


def _set(tree: dict, path: tuple[str, ...], value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def resolve_source(src: str | Path) -> Path:
    """A local model directory, or a Hub id fetched with huggingface_hub when a network exists."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise QCacheError(f"{src}: not a directory")
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(src)))
        except Exception as e:
            raise QCacheError(
                f"{src}: not a local directory, and the Hub download failed ({type(e).__name__})"
            ) from None
    raise QCacheError(f"{src}: no such directory")


def convert_hf(
    src: str | Path, out: str | Path, dtype: str = "float32", *, force: bool = False, progress: bool = True
) -> Path:
    """Convert a Hugging Face LLaVA checkpoint ``src`` into an Orbax checkpoint directory ``out``.

    ``dtype``: float32, bfloat16 or float16 (each tensor is cast as it is read). ``out`` must not
    exist unless ``force``; it is written in a temporary directory and renamed at the end.
    Returns the output path.
    """
    if dtype not in DTYPES:
        raise QCacheError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QCacheError(f"{out} already exists (use --force to overwrite)")
    src_dir = resolve_source(src)
    cfg, _ = load_hf_config(src_dir, dtype)
    params = convert_params(src_dir, cfg, progress=progress)
    with atomic_output_dir(out, force=force) as tmp:
        save_checkpoint(tmp, cfg, params)
        copy_hf_side_files(src_dir, tmp)
    return out
