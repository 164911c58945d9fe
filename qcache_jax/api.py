"""The Python API: ``load(ckpt_dir)`` returns a :class:`QCacheModel`."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import load_params, read_config
from .config import LlavaConfig
from .errors import QCacheError
from .lazy_attention import MODES
from . import schedule as sched


def _to_numpy(x, name):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


class QCacheModel:
    """A loaded checkpoint: ``config``, ``params`` (pytree), ``graphdef``, ``tokenizer``,
    ``processor``, ``schedule`` (from schedule.json, or None) and the inference methods."""

    def __init__(self, config: LlavaConfig, params, *, path: Path | None = None, tokenizer=None, processor=None):
        from .convert import abstract_params

        self.config, self.params, self.path = config, params, path
        self.graphdef, _ = abstract_params(config)
        self.tokenizer, self.processor = tokenizer, processor

    @property
    def num_layers(self) -> int:
        return self.config.text.num_layers

    def module(self):
        """The NNX module with this model's parameters (for inspection; inference is functional)."""
        return nnx.merge(self.graphdef, self.params)

    def resolve_lazy(self, lazy) -> tuple[bool, ...]:
        """A schedule from any accepted form (see :func:`qcache_jax.schedule.resolve`)."""
        return sched.resolve(lazy, self.num_layers, self.path)

    def check_inputs(self, input_ids, pixel_values=None, attention_mask=None):
        """Validate HF-style inputs; returns them as numpy arrays. Raises QCacheError naming the problem."""
        cfg = self.config
        ids = _to_numpy(input_ids, "input_ids")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise QCacheError(f"input_ids must be an integer array [batch, tokens], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.text.vocab_size):
            raise QCacheError(f"input_ids has token ids outside the vocabulary [0, {cfg.text.vocab_size})")
        mask = _to_numpy(attention_mask, "attention_mask")
        if mask is not None:
            mask = mask.reshape(ids.shape) if mask.size == ids.size else mask
            if mask.shape != ids.shape:
                raise QCacheError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
        pv = _to_numpy(pixel_values, "pixel_values")
        n_img_tokens = int((ids == cfg.image_token_id).sum())
        if pv is not None:
            v = cfg.vision
            want = (v.num_channels, v.image_size, v.image_size)
            if pv.ndim != 4 or tuple(pv.shape[1:]) != want:
                raise QCacheError(f"pixel_values must be [N, {want[0]}, {want[1]}, {want[2]}] (NCHW), got {tuple(pv.shape)}")
            expected = pv.shape[0] * cfg.image_tokens_per_image
            if n_img_tokens != expected:
                raise QCacheError(
                    f"image features and image tokens do not match: {pv.shape[0]} image(s) need {expected} "
                    f"image tokens (id {cfg.image_token_id}) in input_ids, found {n_img_tokens}"
                )
            pv = pv.astype(np.float32)
        elif n_img_tokens:
            raise QCacheError(f"input_ids has {n_img_tokens} image tokens but no pixel_values were given")
        return ids.astype(np.int32), pv, mask

    def logits(self, input_ids, pixel_values=None, attention_mask=None, lazy=None, mode: str = "vla", *, unroll: bool = False, attention_impl: str = "auto"):
        """Full-sequence logits [B, T, V] (float32 numpy) with HF's input conventions.

        ``lazy``: a schedule in any accepted form (None = dense); ``mode``: ``vla`` or ``gla``.
        """
        from .model import logits_fn

        if mode not in MODES:
            raise QCacheError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        ids, pv, mask = self.check_inputs(input_ids, pixel_values, attention_mask)
        schedule = self.resolve_lazy(lazy)
        flags = None if not any(schedule) else jnp.asarray(schedule)
        out = logits_fn(
            self.graphdef,
            self.params,
            jnp.asarray(ids),
            None if pv is None else jnp.asarray(pv),
            None if mask is None else jnp.asarray(mask),
            flags,
            mode=mode,
            unroll=unroll,
            attention_impl=attention_impl,
        )
        return np.asarray(out)


def _load_hf_helper(kind: str, path: Path):
    """The tokenizer or processor saved with the checkpoint, or None when it has none."""
    import transformers

    names = {"tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json"), "processor": ("preprocessor_config.json", "processor_config.json")}
    if not any((path / n).is_file() for n in names[kind]):
        return None
    cls = transformers.AutoTokenizer if kind == "tokenizer" else transformers.AutoProcessor
    try:
        return cls.from_pretrained(str(path))
    except Exception as e:  # a broken tokenizer must not block logits; say why it is missing
        import warnings

        warnings.warn(f"{path}: could not load the {kind} ({type(e).__name__}: {e})")
        return None


def load(ckpt_dir: str | Path) -> QCacheModel:
    """Load a checkpoint written by :func:`qcache_jax.convert_hf` (or ``qcache convert``)."""
    path = Path(ckpt_dir).expanduser()
    if not path.is_dir():
        raise QCacheError(f"{ckpt_dir}: no such checkpoint directory")
    cfg = read_config(path)
    params = load_params(path, cfg)
    return QCacheModel(
        cfg, params, path=path, tokenizer=_load_hf_helper("tokenizer", path), processor=_load_hf_helper("processor", path)
    )
