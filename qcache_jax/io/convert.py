"""A Hugging Face checkpoint (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, or a text-only Llama /
Mistral / Qwen2, as safetensors, ``pytorch_model*.bin`` or a GGUF file) -> this project's Orbax
checkpoint.

Driven by the abstract parameter tree of the config's family (:mod:`qcache_jax.nn.families`): every parameter
names the HF tensor it comes from (:mod:`qcache_jax.io.names`). Strict: one error lists every
missing, unexpected and misshapen tensor. The output is written to a temporary directory beside
``out`` and renamed at the end, so a failure or Ctrl-C leaves nothing at ``out``.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from .._files import atomic_output_dir
from ..config import LlavaConfig
from ..errors import QCacheError
from ..nn.families import abstract_model
from .checkpoint import copy_hf_side_files, save_checkpoint, save_tokenizer_and_processor
from .hf_config import from_hf_config
from .names import canonical_name, flax_shape, hf_shape, key_path, param_name, to_flax

DTYPES = ("float32", "bfloat16", "float16")
# Buffers that transformers recomputes at load time; old checkpoints still carry them.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def numpy_dtype(dtype: str):
    """The numpy dtype of a checkpoint dtype name (bfloat16 via ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def _set(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def convert_params(source, cfg: LlavaConfig, *, label: str = "checkpoint", progress: bool = True) -> dict:
    """The parameter pytree (nested dict of numpy arrays in ``cfg.dtype``) read from ``source``
    (a tensor source: ``keys()``, ``shape(name)``, ``get(name)`` with HF names)."""
    names = {canonical_name(k): k for k in source.keys()}
    _, abstract = abstract_model(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    dtype = numpy_dtype(cfg.dtype)
    consumed, missing, misshapen, out = set(), [], [], {}
    for kp, spec in tqdm(leaves, desc="converting", unit="tensor", disable=not progress):
        name, transform = param_name(key_path(kp))
        if name not in names:
            missing.append(name)
            continue
        consumed.add(name)
        got = source.shape(names[name])
        if flax_shape(got, transform) != tuple(spec.shape):
            misshapen.append(f"{names[name]} (got {tuple(got)}, expected {hf_shape(spec.shape, transform)})")
            continue
        # Cast tensor by tensor: peak host memory stays near one copy of the model.
        value = np.ascontiguousarray(to_flax(source.get(names[name]), transform).astype(dtype))
        _set(out, tuple(k.key if hasattr(k, "key") else k.idx for k in kp), value)
    if cfg.text.tie_word_embeddings:
        consumed.add("lm_head.weight")  # a tied head may be saved as a copy of the embeddings
    unexpected = sorted(names[k] for k in names if k not in consumed and not _IGNORED.search(k))
    if missing or unexpected or misshapen:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if items:
                parts.append(f"{what} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise QCacheError(f"{label}: checkpoint does not match the model config; " + "; ".join(parts))
    return out


def load_hf_config(src: Path, dtype: str) -> tuple[LlavaConfig, object]:
    """(our config, the transformers config) of a Hugging Face model directory."""
    from transformers import AutoConfig

    if not (src / "config.json").exists():
        raise QCacheError(f"{src}: no config.json (not a Hugging Face model directory)")
    try:
        hf = AutoConfig.from_pretrained(str(src))
    except (ValueError, KeyError, TypeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QCacheError(f"{src}/config.json: cannot be read as a transformers config ({msg})") from None
    return from_hf_config(hf, dtype=dtype), hf


def resolve_source(src: str | Path) -> Path:
    """A local model directory or GGUF file, or a Hub id fetched with huggingface_hub when a
    network exists."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir() and p.suffix.lower() != ".gguf":
            raise QCacheError(f"{src}: not a model directory or a .gguf file")
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(src)))
        except Exception as e:
            raise QCacheError(
                f"{src}: not a local directory, and the Hub download failed ({type(e).__name__})"
            ) from None
    raise QCacheError(f"{src}: no such directory or file")


def read_source(src: Path, dtype: str):
    """(config, tensor source, writer of the tokenizer/processor side files) for a model
    directory or a GGUF file."""
    if src.is_file():
        from transformers import AutoConfig

        from .gguf import GGUFSource, gguf_tokenizer

        source = GGUFSource(src)
        d = dict(source.config)
        cfg = from_hf_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=dtype)
        return cfg, source, lambda out: save_tokenizer_and_processor(out, tokenizer=gguf_tokenizer(src))
    from .tensors import TensorSource

    cfg, _ = load_hf_config(src, dtype)
    return cfg, TensorSource(src), lambda out: copy_hf_side_files(src, out)


def convert_hf(
    src: str | Path, out: str | Path, dtype: str = "float32", *, force: bool = False, progress: bool = True
) -> Path:
    """Convert a Hugging Face checkpoint ``src`` (a LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL or
    text-only model directory, a Hub id, or a GGUF file) into an Orbax checkpoint directory ``out``.

    ``dtype``: float32, bfloat16 or float16 (each tensor is cast as it is read). ``out`` must not
    exist unless ``force``; it is written in a temporary directory and renamed at the end.
    Returns the output path.
    """
    if dtype not in DTYPES:
        raise QCacheError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise QCacheError(f"{out} already exists (use --force to overwrite)")
    src_path = resolve_source(src)
    cfg, source, write_side_files = read_source(src_path, dtype)
    params = convert_params(source, cfg, label=str(src_path), progress=progress)
    with atomic_output_dir(out, force=force) as tmp:
        save_checkpoint(tmp, cfg, params)
        write_side_files(tmp)
    return out
