"""Backend dispatch: one entry point per operation, `impl` picks the kernel.

impl values:
  "auto"                  GPU -> "pallas_gpu", TPU -> "pallas_tpu", else "xla";
  "xla"                   plain-XLA fast path (kernels/xla.py; CPU default);
  "xla_train"             prefill as the direct formula with a hand-written backward
                          pass (training on CPU; decode as "xla");
  "pallas_gpu"            Pallas Triton kernels (kernels/gpu.py);
  "pallas_tpu"            Pallas Mosaic kernels (kernels/tpu.py);
  "*_interpret"           the same kernels interpreted on any backend (tests).

Layout is head-major everywhere: prefill q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D];
decode q [B, Hq, D], cache [B, Hkv, S, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import gpu, tpu, xla
from ._compat import backend, tpu_interpret

IMPLS = ("auto", "xla", "xla_train", "pallas_gpu", "pallas_tpu", "pallas_gpu_interpret", "pallas_tpu_interpret")


def resolve_impl(impl: str = "auto") -> str:
    """Maps "auto" to the default implementation of the current backend."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend(), "xla")
    return impl


def _kernels(impl):
    """(kernel module, interpret argument) for a resolved Pallas impl."""
    return {
        "pallas_gpu": (gpu, False),
        "pallas_gpu_interpret": (gpu, True),
        "pallas_tpu": (tpu, False),
        "pallas_tpu_interpret": (tpu, tpu_interpret()),
    }[impl]


@functools.partial(jax.jit, static_argnames=("scale", "impl"))
def flash_attention(q, k, v, q_pos, kv_pos, kv_valid, *, q_seg=None, kv_seg=None, scale=None, impl="auto"):
    """Prefill attention with position masks and GQA.

    Args:
      q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D], Hq % Hkv == 0; bf16 or f32.
      q_pos: int32 [B, Tq]; kv_pos: int32 [B, Tk]; kv_valid: bool [B, Tk].
        Key j is visible to query i iff kv_valid and kv_pos[j] <= q_pos[i]
        (positions must be < 2**31 - 1). Query head h reads kv head
        h // (Hq // Hkv).
      q_seg, kv_seg: optional int32 [B, Tq] / [B, Tk] segment ids for packed rows:
        key j must also have kv_seg 0 (a shared prefix) or q_seg[i]. Only the
        "xla" and "xla_train" impls take them.
      scale: softmax scale, default 1/sqrt(D).
      impl: see module docstring.

    Returns:
      out [B, Hq, Tq, D] (q.dtype), lse f32 [B, Hq, Tq]; rows that see no key
      give out 0, lse -inf. Combine key segments with `merge_attention`.
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return xla.prefill(q, k, v, q_pos, kv_pos, kv_valid, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    if impl == "xla_train":
        return xla.train_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    if kv_seg is not None:
        raise NotImplementedError(f"packed segments are not supported by the {impl} kernels; use impl='xla'")
    module, interpret = _kernels(impl)
    return module.prefill(q, k, v, q_pos, kv_pos, kv_valid, scale=scale, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "impl", "return_probs"))
def decode_attention(q, k, v, lengths, *, scale=None, impl="auto", return_probs=False):
    """Attention of one new token per row against a KV cache.

    Args:
      q: [B, Hq, D].
      k, v: [B, Hkv, S, D]. S must be a multiple of 16 on GPU (128
        recommended on TPU). Entries at j >= lengths[b] must be finite (e.g.
        a zero-initialised cache).
      lengths: int32 [B]; keys j < lengths[b] are visible.
      scale: softmax scale, default 1/sqrt(D).
      impl: see module docstring.
      return_probs: also return the normalized probabilities (GLA anchor).

    Returns:
      out [B, Hq, D] (q.dtype), lse f32 [B, Hq] and, with return_probs,
      probs f32 [B, Hq, S] (exactly 0 at j >= lengths[b]). lengths[b] == 0
      gives out 0, lse -inf.
    """
    impl = resolve_impl(impl)
    lengths = lengths.astype(jnp.int32)
    if impl in ("xla", "xla_train"):
        return xla.decode(q, k, v, lengths, scale=scale, return_probs=return_probs)
    module, interpret = _kernels(impl)
    return module.decode(q, k, v, lengths, scale=scale, return_probs=return_probs, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("impl",))
def lazy_decode_pv(probs, v, *, lengths=None, impl="auto"):
    """GLA lazy-layer decode: out[b, h] = sum_j probs[b, h, j] v[b, h // g, j].

    Reads only V (the anchor's probabilities replace Q K^T).

    Args:
      probs: f32 [B, Hq, S], e.g. from `decode_attention(..., return_probs=True)`
        of the anchor layer.
      v: [B, Hkv, S, D].
      lengths: optional int32 [B]; when given, V at j >= lengths[b] is not
        used (the Pallas kernels do not read it); default: all S keys.
      impl: see module docstring.

    Returns:
      out [B, Hq, D] in v.dtype.
    """
    impl = resolve_impl(impl)
    if impl in ("xla", "xla_train"):
        return xla.lazy_pv(probs, v, lengths)
    if lengths is None:
        lengths = jnp.full((probs.shape[0],), probs.shape[-1], jnp.int32)
    module, interpret = _kernels(impl)
    return module.lazy_pv(probs, v, lengths.astype(jnp.int32), interpret=interpret)
