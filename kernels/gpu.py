"""Pallas GPU (Triton lowering) kernels: position-masked prefill, split-K
decode over a head-major KV cache, and the GLA lazy-layer P @ V decode.

All refs are whole arrays (no BlockSpecs): Triton refs are pointers, so the
kernels index q [B, Hq, T, D] and k/v [B, Hkv, T, D] directly -- a (row, kv
head) key range is one contiguous [keys, D] slab, read in place, never sliced
or transposed by XLA. Tiles have power-of-two shapes (a Triton rule); head_dim
is read as power-of-two chunks (80 = 64 + 16) instead of padding the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import pl, triton_params
from .common import (
    DOT_NN,
    DOT_NT,
    POS_NEVER_VISIBLE,
    POS_SEES_NOTHING,
    largest_dividing_block,
    masked_kv_pos,
    pad_axis,
    pow2_chunks,
    probs_from_scores,
    softmax_finish,
)
from .reference import default_scale, merge_stacked
# Decode programs per GPU: enough to saturate HBM on an H100 (132 SMs) at
# batch 1; the split-K partials are merged by XLA.
_TARGET_DECODE_PROGRAMS = 512


def _precision(dtype):
    # f32 inputs: exact IEEE products (Triton's default is TF32); bf16: native.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ---------------------------------------------------------------- prefill


def _prefill_kernel(
    q_ref,
    k_ref,
    v_ref,
    qpos_ref,
    kpos_ref,
    kmin_ref,
    o_ref,
    lse_ref,
    *,
    scale,
    group,
    block_q,
    block_k,
    num_k_blocks,
    chunks,
):
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = lax.div(h, group)
    q_rows = pl.ds(i * block_q, block_q)
    q = [q_ref[b, h, q_rows, pl.ds(c0, cw)] for c0, cw in chunks]
    q_pos = qpos_ref[b, q_rows]
    q_pos_max = jnp.max(q_pos)
    prec = _precision(q[0].dtype)

    def visit(j, carry):
        accs, m, l = carry
        k_rows = pl.ds(j * block_k, block_k)
        s = (
            sum(
                lax.dot_general(
                    qc, k_ref[b, hk, k_rows, pl.ds(c0, cw)], DOT_NT, precision=prec, preferred_element_type=jnp.float32
                )
                for qc, (c0, cw) in zip(q, chunks)
            )
            * scale
        )
        visible = kpos_ref[b, k_rows][None, :] <= q_pos[:, None]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Rows with nothing visible so far keep m = -inf; shift them by 0 so that
        # exp(-inf - -inf) never produces NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        accs = [
            alpha[:, None] * acc
            + lax.dot_general(
                p.astype(v_ref.dtype),
                v_ref[b, hk, k_rows, pl.ds(c0, cw)],
                DOT_NN,
                precision=prec,
                preferred_element_type=jnp.float32,
            )
            for acc, (c0, cw) in zip(accs, chunks)
        ]
        return accs, m_new, l

    def body(j, carry):
        # Positions need not be sorted, so blocks are skipped by their smallest
        # key position rather than by index (for sorted prompts: causal skipping).
        return lax.cond(kmin_ref[b, j] <= q_pos_max, lambda: visit(j, carry), lambda: carry)

    init = (
        [jnp.zeros((block_q, cw), jnp.float32) for _, cw in chunks],
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    accs, m, l = lax.fori_loop(0, num_k_blocks, body, init)
    inv_l, lse = softmax_finish(m, l)
    for acc, (c0, cw) in zip(accs, chunks):
        o_ref[b, h, q_rows, pl.ds(c0, cw)] = (acc * inv_l[:, None]).astype(o_ref.dtype)
    lse_ref[b, h, q_rows] = lse


def prefill(
    q, k, v, q_pos, kv_pos, kv_valid, *, scale=None, interpret=False, block_q=64, block_k=64, num_warps=4, num_stages=2
):
    """Flash attention with position masks and GQA (see reference_attention).

    Tq and Tk are padded up to the block sizes here (padded keys/queries are
    invisible/see nothing); block sizes are clamped to the sequence lengths.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = default_scale(d, scale)
    block_q = min(block_q, max(16, pl.next_power_of_2(tq)))
    block_k = min(block_k, max(16, pl.next_power_of_2(tk)))
    qp = pad_axis(q, 2, block_q, 0)
    q_pos_p = pad_axis(q_pos.astype(jnp.int32), 1, block_q, POS_SEES_NOTHING)
    kp = pad_axis(k, 2, block_k, 0)
    vp = pad_axis(v, 2, block_k, 0)
    kv_pos_p = pad_axis(masked_kv_pos(kv_pos, kv_valid), 1, block_k, POS_NEVER_VISIBLE)
    num_k_blocks = kp.shape[2] // block_k
    k_min = kv_pos_p.reshape(b, num_k_blocks, block_k).min(axis=-1)
    tq_p = qp.shape[2]
    kernel = functools.partial(
        _prefill_kernel,
        scale=scale,
        group=hq // hkv,
        block_q=block_q,
        block_k=block_k,
        num_k_blocks=num_k_blocks,
        chunks=pow2_chunks(d),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(tq_p // block_q, b, hq),
        out_shape=(jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tq_p), jnp.float32)),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="qcache_flash_prefill",
    )(qp, kp, vp, q_pos_p, kv_pos_p, k_min)
    return out[:, :, :tq], lse[:, :, :tq]


# ---------------------------------------------------------------- decode


def _decode_split(s_len, block_k, batch, kv_heads, programs):
    """Number of key splits per (row, kv head): a divisor of S // block_k."""
    n_blocks = s_len // block_k
    want = max(1, min(n_blocks, pl.cdiv(programs, batch * kv_heads)))
    return max(n for n in range(1, want + 1) if n_blocks % n == 0)


def _decode_block(s_len):
    block_k = largest_dividing_block(s_len, (64, 32, 16))
    if block_k is None:
        raise ValueError(f"decode cache length {s_len} must be a multiple of 16")
    return block_k


def _split_range(len_ref, b, block_k, blocks_per_split):
    """First key and number of blocks with at least one key < length."""
    start = pl.program_id(2) * blocks_per_split * block_k
    length = len_ref[b]
    n = jnp.clip(pl.cdiv(length - start, block_k), 0, blocks_per_split)
    return start, length, n


def _decode_kernel(
    len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *score_ref, scale, group, block_k, blocks_per_split, chunks
):
    b, hk, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, length, n = _split_range(len_ref, b, block_k, blocks_per_split)
    rows = [hk * group + r for r in range(group)]
    # g query heads share one K/V tile. Decode is bandwidth bound, so QK^T and
    # PV are broadcast-multiply-reduce on CUDA cores: no tensor-core M >= 16
    # padding of the query group, no padded score stores.
    q = [[q_ref[b, h, pl.ds(c0, cw)].astype(jnp.float32) for c0, cw in chunks] for h in rows]

    def body(j, carry):
        accs, ms, ls = carry
        first = start + j * block_k
        keys = pl.ds(first, block_k)
        kt = [k_ref[b, hk, keys, pl.ds(c0, cw)].astype(jnp.float32) for c0, cw in chunks]
        vt = [v_ref[b, hk, keys, pl.ds(c0, cw)].astype(jnp.float32) for c0, cw in chunks]
        valid = first + jnp.arange(block_k) < length
        new = ([], [], [])
        for r, h in enumerate(rows):
            s = sum(jnp.sum(kc * qc[None, :], axis=1) for kc, qc in zip(kt, q[r]))
            s = jnp.where(valid, s * scale, -jnp.inf)
            if score_ref:
                score_ref[0][b, h, keys] = s
            # Every visited block holds a valid key, so m_new is finite.
            m_new = jnp.maximum(ms[r], jnp.max(s))
            alpha = jnp.exp(ms[r] - m_new)
            p = jnp.exp(s - m_new)
            new[0].append([alpha * a + jnp.sum(p[:, None] * vc, axis=0) for a, vc in zip(accs[r], vt)])
            new[1].append(m_new)
            new[2].append(alpha * ls[r] + jnp.sum(p))
        return new

    init = (
        [[jnp.zeros((cw,), jnp.float32) for _, cw in chunks] for _ in rows],
        [jnp.float32(-jnp.inf)] * group,
        [jnp.float32(0)] * group,
    )
    accs, ms, ls = lax.fori_loop(0, n, body, init)
    for r, h in enumerate(rows):
        inv_l, lse = softmax_finish(ms[r], ls[r])
        for acc, (c0, cw) in zip(accs[r], chunks):
            o_ref[b, h, split, pl.ds(c0, cw)] = acc * inv_l
        lse_ref[b, h, split] = lse


def decode(
    q,
    k,
    v,
    lengths,
    *,
    scale=None,
    return_probs=False,
    interpret=False,
    num_warps=4,
    num_stages=2,
    programs=_TARGET_DECODE_PROGRAMS,
):
    """Split-K decode attention over a head-major cache, read in place.

    q [B, Hq, D]; k/v [B, Hkv, S, D]; lengths int32 [B]. S must be a multiple
    of 16. `programs`: target grid size (sets the number of key splits).
    Returns (out, lse[, probs]).
    """
    b, hkv, s_len, d = k.shape
    hq = q.shape[1]
    scale = default_scale(d, scale)
    block_k = _decode_block(s_len)
    splits = _decode_split(s_len, block_k, b, hkv, programs)
    lengths = lengths.astype(jnp.int32)
    out_shape = [
        jax.ShapeDtypeStruct((b, hq, splits, d), jnp.float32),
        jax.ShapeDtypeStruct((b, hq, splits), jnp.float32),
    ]
    if return_probs:
        out_shape.append(jax.ShapeDtypeStruct((b, hq, s_len), jnp.float32))
    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        group=hq // hkv,
        block_k=block_k,
        blocks_per_split=s_len // block_k // splits,
        chunks=pow2_chunks(d),
    )
    res = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        out_shape=tuple(out_shape),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="qcache_decode",
    )(lengths, q, k, v)
    out, lse = merge_stacked(res[0], res[1], axis=2, dtype=q.dtype)
    if return_probs:
        return out, lse, probs_from_scores(res[2], lse, lengths)
    return out, lse


def _lazy_pv_kernel(len_ref, p_ref, v_ref, o_ref, *, group, block_k, blocks_per_split, chunks):
    b, hk, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, length, n = _split_range(len_ref, b, block_k, blocks_per_split)
    rows = [hk * group + r for r in range(group)]

    def body(j, accs):
        first = start + j * block_k
        keys = pl.ds(first, block_k)
        vt = [v_ref[b, hk, keys, pl.ds(c0, cw)].astype(jnp.float32) for c0, cw in chunks]
        valid = first + jnp.arange(block_k) < length
        out = []
        for r, h in enumerate(rows):
            p = jnp.where(valid, p_ref[b, h, keys], 0.0)
            out.append([a + jnp.sum(p[:, None] * vc, axis=0) for a, vc in zip(accs[r], vt)])
        return out

    init = [[jnp.zeros((cw,), jnp.float32) for _, cw in chunks] for _ in rows]
    accs = lax.fori_loop(0, n, body, init)
    for r, h in enumerate(rows):
        for acc, (c0, cw) in zip(accs[r], chunks):
            o_ref[b, h, split, pl.ds(c0, cw)] = acc


def lazy_pv(probs, v, lengths, *, interpret=False, num_warps=4, num_stages=2, programs=_TARGET_DECODE_PROGRAMS):
    """GLA lazy decode: probs [B, Hq, S] @ V [B, Hkv, S, D], reading V only.

    Only keys j < lengths[b] are read; returns out [B, Hq, D] in v.dtype.
    """
    b, hkv, s_len, d = v.shape
    hq = probs.shape[1]
    block_k = _decode_block(s_len)
    splits = _decode_split(s_len, block_k, b, hkv, programs)
    kernel = functools.partial(
        _lazy_pv_kernel,
        group=hq // hkv,
        block_k=block_k,
        blocks_per_split=s_len // block_k // splits,
        chunks=pow2_chunks(d),
    )
    part = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        out_shape=jax.ShapeDtypeStruct((b, hq, splits, d), jnp.float32),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="qcache_lazy_pv",
    )(lengths.astype(jnp.int32), probs.astype(jnp.float32), v)
    return part.sum(axis=2).astype(v.dtype)
