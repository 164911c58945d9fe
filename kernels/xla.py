"""The "xla" impl (CPU default): attention in plain XLA ops, written so that
XLA CPU runs it without copying the KV cache.

Decode and lazy P @ V (head-major cache [B, Hkv, S, D]):
  s = dot_general(q [B, Hkv, g, D], k [B, Hkv, S, D]) contracting D, batch
      (B, Hkv) leading on both sides   -> [B, Hkv, g, S] f32
  o = dot_general(p [B, Hkv, g, S], v [B, Hkv, S, D]) contracting S
                                     -> [B, Hkv, g, D] f32
Both dots have their batch dimensions leading and the cache operand in its
stored layout (k contracted on its minor dim, "NT"; v on its row dim, "NN"),
so the optimized HLO is two dot fusions reading k and v in place: no
transpose, no copy. Accumulation is f32 through `preferred_element_type`
(bf16 caches are never converted to f32 as a whole); for bf16 the
probabilities are rounded to bf16 before P @ V, as in every flash kernel.
With g == 1 and bf16, XLA CPU would canonicalize the degenerate dot into a
matrix-vector product for Eigen, which has no bf16 kernel and would convert
the whole cache to f32; the query group is padded to 2 rows (a copy of q,
not of the cache) to keep the dot on the bf16 path. `tests/test_kernels.py`
checks the optimized HLO for cache-sized copies/transposes/converts.

Prefill: the direct formula (`reference_attention`) for short key sequences;
for longer ones a flash-style online softmax over key blocks in plain jnp
(`lax.scan`), which never materializes the [B, Hq, Tq, Tk] f32 scores.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

import jax

from .common import POS_NEVER_VISIBLE, POS_SEES_NOTHING, masked_kv_pos, pad_axis, softmax_finish
from .reference import default_scale, reference_attention, visibility

_F32 = jnp.float32
# dot_general dimension numbers with batch dims (B, Hkv) leading.
_QK = (((3,), (3,)), ((0, 1), (0, 1)))  # [B,H,g,D] x [B,H,S,D] -> [B,H,g,S]
_PV = (((3,), (2,)), ((0, 1), (0, 1)))  # [B,H,g,S] x [B,H,S,D] -> [B,H,g,D]


def _precision(dtype):
    # Exact f32 products on every backend (the "xla" impl may run on GPU/TPU).
    return lax.Precision.HIGHEST if dtype == _F32 else None


def _padded_group(g, dtype):
    """Query rows per kv head fed to the decode dots (see module docstring)."""
    return 2 if (g == 1 and dtype != _F32) else g


def _pad_rows(x, rows, mode):
    """Pads axis 2 of x to `rows` by repeating it ("edge") or with zeros."""
    extra = rows - x.shape[2]
    if extra == 0:
        return x
    fill = jnp.repeat(x[:, :, -1:], extra, axis=2) if mode == "edge" else jnp.zeros_like(x[:, :, :1]).repeat(extra, 2)
    return jnp.concatenate([x, fill], axis=2)


def decode(q, k, v, lengths, *, scale=None, return_probs=False):
    """One query per row against a head-major cache (see dispatch.decode_attention)."""
    b, hkv, s_len, d = k.shape
    hq = q.shape[1]
    g = hq // hkv
    scale = default_scale(d, scale)
    gp = _padded_group(g, k.dtype)
    qg = _pad_rows(q.reshape(b, hkv, g, d), gp, "edge")
    s = lax.dot_general(qg, k, _QK, precision=_precision(k.dtype), preferred_element_type=_F32) * scale
    valid = (jnp.arange(s_len, dtype=jnp.int32)[None, :] < lengths[:, None])[:, None, None, :]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))  # exactly 0 past the length
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = lax.dot_general(p.astype(v.dtype), v, _PV, precision=_precision(v.dtype), preferred_element_type=_F32)
    inv_l, lse = softmax_finish(m, l)
    out = (o * inv_l)[:, :, :g].reshape(b, hq, d).astype(q.dtype)
    lse = lse[:, :, :g, 0].reshape(b, hq)
    if return_probs:
        return out, lse, (p * inv_l)[:, :, :g].reshape(b, hq, s_len)
    return out, lse


def lazy_pv(probs, v, lengths=None):
    """out[b, h] = sum_j probs[b, h, j] v[b, h // g, j] with f32 accumulation."""
    b, hkv, s_len, d = v.shape
    hq = probs.shape[1]
    g = hq // hkv
    p = probs.astype(_F32).reshape(b, hkv, g, s_len)
    if lengths is not None:
        valid = jnp.arange(s_len, dtype=jnp.int32)[None, :] < lengths.astype(jnp.int32)[:, None]
        p = jnp.where(valid[:, None, None, :], p, 0.0)
    p = _pad_rows(p, _padded_group(g, v.dtype), "zeros")
    o = lax.dot_general(p.astype(v.dtype), v, _PV, precision=_precision(v.dtype), preferred_element_type=_F32)
    return o[:, :, :g].reshape(b, hq, d).astype(v.dtype)


# Prefill: key sequences up to this length use the direct formula (faster on
# CPU there, measured; see README), longer ones the blocked online softmax.
DIRECT_MAX_TK = 64
PREFILL_BLOCK_Q = 256
PREFILL_BLOCK_K = 256


def prefill(q, k, v, q_pos, kv_pos, kv_valid, *, q_seg=None, kv_seg=None, scale=None, block_q=None, block_k=None):
    """Position-masked GQA prefill (see dispatch.flash_attention).

    Tk <= DIRECT_MAX_TK (and no explicit blocks): `reference_attention`. Otherwise
    `prefill_blocked`, with or without packed segments.
    """
    if block_q is None and block_k is None and k.shape[2] <= DIRECT_MAX_TK:
        return reference_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg=q_seg, kv_seg=kv_seg, scale=scale)
    return prefill_blocked(
        q, k, v, q_pos, kv_pos, kv_valid, q_seg=q_seg, kv_seg=kv_seg, scale=scale, block_q=block_q or PREFILL_BLOCK_Q,
        block_k=block_k or PREFILL_BLOCK_K,
    )


_SEG_PAD_Q, _SEG_PAD_K = -1, -2  # padded queries / keys: a segment no other entry has (never 0)


def _segment_ranges(seg, keep, n_blocks, block):
    """Per block (over every row), the smallest and largest segment id among ``keep`` entries
    and whether any of them is segment 0 (the shared prefix every query sees)."""
    big = jnp.iinfo(jnp.int32).max
    b = seg.shape[0]
    s = seg.reshape(b, n_blocks, block)
    k = keep.reshape(b, n_blocks, block)
    lo = jnp.where(k, s, big).min(axis=(0, 2))
    hi = jnp.where(k, s, -big).max(axis=(0, 2))
    zero = (k & (s == 0)).any(axis=(0, 2))
    return lo, hi, zero


def prefill_blocked(q, k, v, q_pos, kv_pos, kv_valid, *, q_seg=None, kv_seg=None, scale=None, block_q=512,
                    block_k=512):
    """Flash-style prefill in plain jnp: an outer loop over query blocks and an
    inner loop over key blocks with an online softmax (running max m, sum l,
    f32 accumulator rescaled by exp(m_old - m_new)). Live memory is one
    [B, Hq, block_q, block_k] score tile, never [B, Hq, Tq, Tk].

    Key blocks whose smallest position is after every query position of the
    query block (in every row) are skipped, which for sorted positions is
    causal block skipping. Sequences are padded to the block sizes (padded
    keys are invisible, padded queries see nothing and are cut off).

    Packed segments (``q_seg`` / ``kv_seg``, as `reference_attention` takes them): key j is
    also visible only in segment 0 or the query's segment, and a key block is skipped when no
    key of it is in segment 0 or in the range of the query block's segments. For contiguous
    segments (a vision tower's images and windows) that leaves only the diagonal blocks: the
    work and the live memory grow with the segments' sizes, not with the packed length squared.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = default_scale(d, scale)
    block_q = min(block_q, tq)
    block_k = min(block_k, tk)
    qp = pad_axis(q, 2, block_q, 0)
    kp = pad_axis(k, 2, block_k, 0)
    vp = pad_axis(v, 2, block_k, 0)
    q_pos_p = pad_axis(q_pos.astype(jnp.int32), 1, block_q, POS_SEES_NOTHING)
    kv_pos_p = pad_axis(masked_kv_pos(kv_pos, kv_valid), 1, block_k, POS_NEVER_VISIBLE)
    tq_p, tk_p = qp.shape[2], kp.shape[2]
    nq, nk = tq_p // block_q, tk_p // block_k
    k_min = kv_pos_p.reshape(b, nk, block_k).min(axis=-1).min(axis=0)  # [nk]
    q_max = q_pos_p.reshape(b, nq, block_q).max(axis=-1).max(axis=0)  # [nq]
    segmented = kv_seg is not None
    if segmented:
        q_seg_p = pad_axis(q_seg.astype(jnp.int32), 1, block_q, _SEG_PAD_Q)
        kv_seg_p = pad_axis(jnp.where(kv_valid, kv_seg, _SEG_PAD_K).astype(jnp.int32), 1, block_k, _SEG_PAD_K)
        q_lo, q_hi, _ = _segment_ranges(q_seg_p, q_seg_p != _SEG_PAD_Q, nq, block_q)
        k_lo, k_hi, k_zero = _segment_ranges(kv_seg_p, kv_seg_p != _SEG_PAD_K, nk, block_k)
    qg = qp.reshape(b, hkv, g, tq_p, d)
    prec = _precision(q.dtype)

    def q_block(i, outs):
        out_buf, lse_buf = outs
        qi = lax.dynamic_slice_in_dim(qg, i * block_q, block_q, axis=3).reshape(b, hkv, g * block_q, d)
        qpos_i = lax.dynamic_slice_in_dim(q_pos_p, i * block_q, block_q, axis=1)
        qseg_i = lax.dynamic_slice_in_dim(q_seg_p, i * block_q, block_q, axis=1) if segmented else None

        def visit(j, carry):
            m, l, acc = carry
            kj = lax.dynamic_slice_in_dim(kp, j * block_k, block_k, axis=2)
            vj = lax.dynamic_slice_in_dim(vp, j * block_k, block_k, axis=2)
            kpos_j = lax.dynamic_slice_in_dim(kv_pos_p, j * block_k, block_k, axis=1)
            s = lax.dot_general(qi, kj, _QK, precision=prec, preferred_element_type=_F32) * scale
            s = s.reshape(b, hkv, g, block_q, block_k)
            visible = kpos_j[:, None, :] <= qpos_i[:, :, None]  # [B, bq, bk]
            if segmented:
                kseg_j = lax.dynamic_slice_in_dim(kv_seg_p, j * block_k, block_k, axis=1)
                visible &= (kseg_j[:, None, :] == qseg_i[:, :, None]) | (kseg_j[:, None, :] == 0)
            s = jnp.where(visible[:, None, None], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            # Rows with nothing visible so far keep m = -inf; shift them by 0.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
            pv = lax.dot_general(
                p.astype(v.dtype).reshape(b, hkv, g * block_q, block_k), vj, _PV, precision=prec,
                preferred_element_type=_F32,
            )
            acc = alpha * acc + pv.reshape(b, hkv, g, block_q, d)
            return m_new, l, acc

        def k_block(j, carry):
            needed = k_min[j] <= q_max[i]
            if segmented:
                needed &= k_zero[j] | ((k_hi[j] >= q_lo[i]) & (k_lo[j] <= q_hi[i]))
            return lax.cond(needed, lambda c: visit(j, c), lambda c: c, carry)

        init = (
            jnp.full((b, hkv, g, block_q, 1), -jnp.inf, _F32),
            jnp.zeros((b, hkv, g, block_q, 1), _F32),
            jnp.zeros((b, hkv, g, block_q, d), _F32),
        )
        m, l, acc = lax.fori_loop(0, nk, k_block, init)
        inv_l, lse = softmax_finish(m, l)
        out_i = (acc * inv_l).astype(q.dtype).reshape(b, hq, block_q, d)
        out_buf = lax.dynamic_update_slice_in_dim(out_buf, out_i, i * block_q, axis=2)
        lse_buf = lax.dynamic_update_slice_in_dim(lse_buf, lse.reshape(b, hq, block_q), i * block_q, axis=2)
        return out_buf, lse_buf

    outs = (jnp.zeros((b, hq, tq_p, d), q.dtype), jnp.zeros((b, hq, tq_p), _F32))
    out, lse = lax.fori_loop(0, nq, q_block, outs)
    return out[:, :, :tq], lse[:, :, :tq]


# -- training: the direct formula with a hand-written backward pass ------------------------------


def train_attention(q, k, v, q_pos, kv_pos, kv_valid, *, q_seg=None, kv_seg=None, scale=None):
    """`reference_attention`'s numbers for training-length sequences, differentiable with a
    hand-written backward pass: one [g*Tq, Tk] float32 score matrix per KV head (the g query
    heads of a KV head stacked along rows), softmax saved for the backward. XLA CPU runs this
    about 1.5x faster than autodiff of the forward (measured on the real-weights training).
    Returns (out [B, Hq, Tq, D] in q.dtype, lse f32 [B, Hq, Tq])."""
    mask = visibility(q_pos, kv_pos, kv_valid, q_seg, kv_seg)
    # lse is differentiated too: a VLA lazy layer merges two key sets by it in training
    return _train_attention(q, k, v, mask, default_scale(q.shape[-1], scale))


def _train_fwd_impl(q, k, v, mask, scale):
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * tq, d).astype(_F32)
    s = lax.dot_general(qg, k.astype(_F32), _QK, preferred_element_type=_F32) * scale  # [B, Hkv, g*Tq, Tk]
    visible = jnp.tile(mask[:, None], (1, 1, g, 1))
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    out = lax.dot_general(p, v.astype(_F32), _PV, preferred_element_type=_F32)
    lse = jnp.where(l > 0, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return (out.reshape(b, hq, tq, d).astype(q.dtype), lse.reshape(b, hq, tq)), p


@jax.custom_vjp
def _train_attention(q, k, v, mask, scale):
    return _train_fwd_impl(q, k, v, mask, scale)[0]


def _train_vjp_fwd(q, k, v, mask, scale):
    out, p = _train_fwd_impl(q, k, v, mask, scale)
    return out, (q, k, v, p, scale)


def _train_vjp_bwd(res, cotangents):
    q, k, v, p, scale = res
    do, dlse = cotangents
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    dog = do.reshape(b, hkv, g * tq, d).astype(_F32)
    dv = lax.dot_general(p, dog, (((2,), (2,)), ((0, 1), (0, 1))), preferred_element_type=_F32)  # [B,Hkv,Tk,D]
    dp = lax.dot_general(dog, v.astype(_F32), _QK, preferred_element_type=_F32)  # [B,Hkv,g*Tq,Tk]
    # d lse / d s = p: the lse cotangent joins the softmax's
    dl = dlse.astype(_F32).reshape(b, hkv, g * tq, 1)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True) + dl) * scale
    dq = lax.dot_general(ds, k.astype(_F32), _PV, preferred_element_type=_F32).reshape(b, hq, tq, d)
    qg = q.reshape(b, hkv, g * tq, d).astype(_F32)
    dk = lax.dot_general(ds, qg, (((2,), (2,)), ((0, 1), (0, 1))), preferred_element_type=_F32)  # [B,Hkv,Tk,D]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_train_attention.defvjp(_train_vjp_fwd, _train_vjp_bwd)
