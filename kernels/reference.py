"""Plain-jnp attention: the test oracle for every kernel in this package.

Conventions shared by all kernels in this package (HEAD-MAJOR layout):
  * prefill q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; GQA with g = Hq // Hkv,
    query head h reads kv head h // g;
  * decode q [B, Hq, D], cache k/v [B, Hkv, S, D];
  * key j is visible to query i iff kv_valid[b, j] and
    kv_pos[b, j] <= q_pos[b, i] (a causal mask by position, so attention
    does not depend on key order and disjoint key segments combine exactly
    with `merge_attention`);
  * float32 softmax; out has q's dtype; lse is float32 log-sum-exp of the
    scaled, masked scores ([B, Hq, Tq] / [B, Hq]); a query with no visible
    key gives out 0, lse -inf.

This module is the direct formula (O(Tq*Tk) memory). The fast CPU path is
`xla.py`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

# f32 matmuls must not silently drop to TF32/bf16 passes on GPU/TPU: the
# reference defines the numbers every kernel is tested against.
_HIGHEST = lax.Precision.HIGHEST


def default_scale(head_dim: int, scale: float | None) -> float:
    """Softmax scale: `scale` if given, else 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def safe_softmax_stats(s, axis=-1):
    """Row max, exp and sum of f32 scores that may hold -inf (masked) entries.

    Returns (p, l, lse) with p = exp(s - m) (0 at -inf), l = sum(p) and
    lse = m + log(l), -inf for rows whose entries are all -inf; the row max is
    replaced by 0 there so that no -inf - -inf = NaN appears.
    """
    m = jnp.max(s, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=axis, keepdims=True)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return p, l, jnp.squeeze(lse, axis)


def visibility(q_pos, kv_pos, kv_valid, q_seg=None, kv_seg=None):
    """[B, Tq, Tk] bool: key j visible to query i iff kv_valid[j], kv_pos[j] <= q_pos[i] and,
    with segment ids, kv_seg[j] is 0 (a prefix every segment shares) or equals q_seg[i]."""
    mask = kv_valid[:, None, :] & (kv_pos[:, None, :] <= q_pos[:, :, None])
    if kv_seg is not None:
        mask &= (kv_seg[:, None, :] == 0) | (kv_seg[:, None, :] == q_seg[:, :, None])
    return mask


def reference_attention(q, k, v, q_pos, kv_pos, kv_valid, *, q_seg=None, kv_seg=None, scale=None, return_probs=False):
    """Position-masked GQA attention, computed directly (O(Tq*Tk) memory).

    Args:
      q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq % Hkv == 0.
      q_pos: int32 [B, Tq]; kv_pos: int32 [B, Tk]; kv_valid: bool [B, Tk].
      q_seg, kv_seg: optional int32 segment ids [B, Tq] / [B, Tk] (see `visibility`):
        several sequences packed in one row after a shared prefix (segment 0).
      scale: softmax scale, default 1/sqrt(D).
      return_probs: also return the normalized probabilities.

    Returns:
      (out [B, Hq, Tq, D] in q.dtype, lse f32 [B, Hq, Tq]) and, with
      return_probs, probs f32 [B, Hq, Tq, Tk] (0 at invisible keys).
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = default_scale(d, scale)
    qf = q.astype(jnp.float32).reshape(b, hkv, g, tq, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qf, k.astype(jnp.float32), precision=_HIGHEST) * scale
    mask = visibility(q_pos, kv_pos, kv_valid, q_seg, kv_seg)  # [B, Tq, Tk]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p, l, lse = safe_softmax_stats(s)
    p = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32), precision=_HIGHEST)
    out = out.reshape(b, hq, tq, d).astype(q.dtype)
    lse = lse.reshape(b, hq, tq)
    if return_probs:
        return out, lse, p.reshape(b, hq, tq, -1)
    return out, lse


def merge_attention(outs, lses):
    """Exactly combines attention computed over disjoint key segments.

    Each (outs[i], lses[i]) is one segment's normalized output and log-sum-exp
    for the same queries; the result equals attention over the union of the
    segments' keys. Shapes: outs[i] [..., D], lses[i] f32 [...] (e.g.
    [B, Hq, Tq, D] / [B, Hq, Tq] for prefill, [B, Hq, D] / [B, Hq] for decode).
    Segments with lse -inf (no visible key) get weight 0; if every segment is
    empty the result is out 0, lse -inf.

    Returns:
      (out in outs[0].dtype, lse f32).
    """
    o = jnp.stack([x.astype(jnp.float32) for x in outs])
    lse = jnp.stack([x.astype(jnp.float32) for x in lses])
    return merge_stacked(o, lse, axis=0, dtype=outs[0].dtype)


def merge_stacked(o, lse, *, axis, dtype):
    """`merge_attention` over one axis of stacked partial results.

    o has lse's shape plus a trailing D axis; also used to combine the split-K
    partials of the decode kernels.
    """
    w, total, lse_out = safe_softmax_stats(lse, axis=axis)
    w = w / jnp.where(total > 0, total, 1.0)
    out = jnp.sum(jnp.expand_dims(w, -1) * o, axis=axis)
    return out.astype(dtype), lse_out


def decode_reference(q, k, v, lengths, *, scale=None, return_probs=False):
    """`reference_attention` for one query per row against keys j < lengths[b].

    q [B, Hq, D]; k/v [B, Hkv, S, D]; lengths int32 [B]. Returns (out [B, Hq, D],
    lse [B, Hq]) and, with return_probs, probs f32 [B, Hq, S].
    """
    b, _, s, _ = k.shape
    zeros_q = jnp.zeros((b, 1), jnp.int32)
    kv_valid = jnp.arange(s, dtype=jnp.int32)[None, :] < lengths[:, None]
    res = reference_attention(
        q[:, :, None], k, v, zeros_q, jnp.zeros((b, s), jnp.int32), kv_valid, scale=scale, return_probs=return_probs
    )
    out, lse = res[0][:, :, 0], res[1][:, :, 0]
    return (out, lse, res[2][:, :, 0]) if return_probs else (out, lse)


def lazy_pv_reference(probs, v):
    """out[b, h] = sum_j probs[b, h, j] v[b, h // g, j] (f32 accumulation)."""
    b, hq, s = probs.shape
    hkv, _, d = v.shape[1:]
    p = probs.astype(jnp.float32).reshape(b, hkv, hq // hkv, s)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32), precision=_HIGHEST)
    return out.reshape(b, hq, d).astype(v.dtype)
