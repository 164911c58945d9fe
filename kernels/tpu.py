"""Pallas TPU (Mosaic) kernels: position-masked prefill, decode over a
head-major KV cache, and the GLA lazy-layer P @ V decode.

Mosaic tiles refs through BlockSpecs (HBM -> VMEM pipelining). The layout is
head-major, q [B, Hq, T, D] and k/v [B, Hkv, T, D], so a block is a
(rows, D) tile of one head for any head_dim and nothing is transposed. The
per-row cache lengths are scalar-prefetch arguments read by the index maps:
the pipeline stops fetching K/V blocks past each row's length.

Block sizes are chosen so that the double-buffered tiles, the scratch and the
score intermediates fit the scoped VMEM (`prefill_vmem_bytes`,
`decode_vmem_bytes`; see README "VMEM budget"); `vmem_limit_bytes` is raised
only when a chosen configuration would not fit the 16 MiB default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import pl, pltpu, tpu_params, vmem
from .common import (
    DOT_NN,
    DOT_NT,
    POS_NEVER_VISIBLE,
    POS_SEES_NOTHING,
    largest_dividing_block,
    masked_kv_pos,
    pad_axis,
    probs_from_scores,
    softmax_finish,
)
from .reference import default_scale

MIB = 1 << 20
# Mosaic's default scoped-VMEM limit (v4/v5e; v6e/v7x default to 32 MiB).
DEFAULT_SCOPED_VMEM = 16 * MIB
# What the chosen blocks may use: leaves headroom under the default for
# Mosaic's internal scratch and values we do not count.
VMEM_BUDGET = 12 * MIB
# K (or V) tile of one decode grid step: big enough that a DMA (~2 MiB, ~3 us
# at v5e HBM speed) dwarfs the ~0.35 us per-step overhead.
_DECODE_TILE_BYTES = 2 * MIB


def _dot(a, b, dims):
    # f32 inputs: full-precision MXU passes (the default may use bf16 passes).
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- VMEM model


def tile_bytes(shape, dtype):
    """VMEM bytes of a buffer: the last two dims padded to the TPU tile
    (sublanes 8 for 32-bit, 16 for 16-bit types; lanes 128)."""
    itemsize = jnp.dtype(dtype).itemsize
    *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    sublanes = 8 * max(1, 4 // itemsize)
    n = -(-rows // sublanes) * sublanes * (-(-cols // 128) * 128) * itemsize
    for x in lead:
        n *= x
    return n


def prefill_vmem_bytes(block_q, block_k, d, dtype):
    """Scoped-VMEM footprint of one prefill grid step (upper estimate).

    Double-buffered blocks: q, k, v, out (dtype), q positions (block_q, 1),
    kv positions (1, block_k), lse out (block_q, 1); scratch m, l
    (block_q, 1) and acc (block_q, d) in f32; the f32 score and probability
    tiles (block_q, block_k) plus the probability tile cast to dtype.
    """
    f32, i32 = jnp.float32, jnp.int32
    buffers = (
        2 * tile_bytes((block_q, d), dtype)  # q
        + 4 * tile_bytes((block_k, d), dtype)  # k, v
        + 2 * tile_bytes((block_q, d), dtype)  # out
        + 2 * tile_bytes((block_q, 1), i32)
        + 2 * tile_bytes((1, block_k), i32)
        + 2 * tile_bytes((block_q, 1), f32)  # lse
    )
    scratch = 2 * tile_bytes((block_q, 1), f32) + tile_bytes((block_q, d), f32)
    values = 2 * tile_bytes((block_q, block_k), f32) + tile_bytes((block_q, block_k), dtype)
    return buffers + scratch + values


def decode_vmem_bytes(heads_per_block, group, block_k, d, dtype, *, return_probs=True, lazy=False):
    """Scoped-VMEM footprint of one decode (or lazy P @ V) grid step.

    Double-buffered: q (h, g, d), K and V (h, block_k, d) -- V only for the
    lazy kernel, which reads probabilities (h, g, block_k) f32 instead of q
    -- out (h, g, d), lse (h, g, 1) f32, scores (h, g, block_k) f32 with
    return_probs; scratch m, l (h, g, 1) and acc (h, g, d) f32; per-head
    score / probability values (g, block_k) f32.
    """
    f32, h, g = jnp.float32, heads_per_block, group
    kv = 2 * tile_bytes((h, block_k, d), dtype) * (1 if lazy else 2)
    if lazy:
        ins = 2 * tile_bytes((h, g, block_k), f32)
        outs = 2 * tile_bytes((h, g, d), dtype)
        scratch = tile_bytes((h, g, d), f32)
        values = 2 * tile_bytes((g, block_k), f32)
    else:
        ins = 2 * tile_bytes((h, g, d), dtype)
        outs = 2 * tile_bytes((h, g, d), dtype) + 2 * tile_bytes((h, g, 1), f32)
        if return_probs:
            outs += 2 * tile_bytes((h, g, block_k), f32)
        scratch = 2 * tile_bytes((h, g, 1), f32) + tile_bytes((h, g, d), f32)
        values = 3 * tile_bytes((g, block_k), f32)
    return kv + ins + outs + scratch + values


def _vmem_limit(footprint):
    """None (Mosaic default) when the footprint fits the budget, else a limit
    with 25% headroom."""
    return None if footprint <= VMEM_BUDGET else int(footprint * 1.25) + 2 * MIB


def prefill_blocks(tq, tk, d, dtype, block_q=None, block_k=None):
    """(block_q, block_k) for a prefill: up to 512 x 512. block_k is a
    multiple of 128 (the lane width of the kv-position block): 512 or 256 if
    that wastes at most 1/8 of Tk in padding, else 128. block_q splits Tq into
    the fewest <= 512-row blocks of equal size (a multiple of the sublane
    tile), halved while the footprint exceeds VMEM_BUDGET."""
    sub = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    if block_k is None:
        block_k = 128
        for c in (512, 256):
            if -tk % c <= tk // 8:
                block_k = c
                break
    if block_q is None:
        # The fewest query blocks of <= 512 rows, balanced (576 -> 2 x 288).
        nq = -(-tq // 512)
        block_q = -(-(-(-tq // nq)) // sub) * sub
        while block_q > sub and prefill_vmem_bytes(block_q, block_k, d, dtype) > VMEM_BUDGET:
            block_q = max(sub, (block_q // 2) // sub * sub)
    return block_q, block_k


def decode_blocks(hkv, group, s_len, d, dtype, *, return_probs=True, lazy=False):
    """(kv heads per block, block_k) for decode: block_k the largest of
    512/256/128 dividing S (else all of S), then as many kv heads (a divisor
    of Hkv) as keep one K tile <= 2 MiB and the footprint <= VMEM_BUDGET."""
    block_k = largest_dividing_block(s_len, (512, 256, 128)) or s_len
    itemsize = jnp.dtype(dtype).itemsize
    heads = 1
    for h in range(1, hkv + 1):
        if hkv % h:
            continue
        fits = decode_vmem_bytes(h, group, block_k, d, dtype, return_probs=return_probs, lazy=lazy) <= VMEM_BUDGET
        if h * block_k * d * itemsize <= _DECODE_TILE_BYTES and fits:
            heads = h
    return heads, block_k


# ---------------------------------------------------------------- prefill


def _prefill_kernel(
    kmin_ref,
    qmax_ref,
    q_ref,
    k_ref,
    v_ref,
    qpos_ref,
    kpos_ref,
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    scale,
    num_q_blocks,
    num_k_blocks,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    # Positions need not be sorted: skip a key block when its smallest position
    # is after every query position of this query block.
    @pl.when(kmin_ref[b * num_k_blocks + j] <= qmax_ref[b * num_q_blocks + i])
    def _visit():
        s = _dot(q_ref[...], k_ref[...], DOT_NT) * scale  # [bq, bk]
        s = jnp.where(kpos_ref[...] <= qpos_ref[...], s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Rows with nothing visible yet keep m = -inf; shift by 0 to avoid NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...], DOT_NN)
        m_sc[...] = m_new

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        inv_l, lse = softmax_finish(m_sc[...], l_sc[...])
        o_ref[...] = (acc_sc[...] * inv_l).astype(o_ref.dtype)
        lse_ref[...] = lse


def prefill(q, k, v, q_pos, kv_pos, kv_valid, *, scale=None, interpret=False, block_q=None, block_k=None):
    """Flash attention with position masks and GQA (see reference_attention).

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]. Blocks default to
    `prefill_blocks`; Tq is padded to block_q and Tk to block_k (padded keys
    are invisible, padded queries see nothing; the pad is skipped when the
    lengths are block multiples).
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = default_scale(d, scale)
    block_q, block_k = prefill_blocks(tq, tk, d, q.dtype, block_q, block_k)
    qp = pad_axis(q, 2, block_q, 0)
    kp = pad_axis(k, 2, block_k, 0)
    vp = pad_axis(v, 2, block_k, 0)
    q_pos_p = pad_axis(q_pos.astype(jnp.int32), 1, block_q, POS_SEES_NOTHING)
    kv_pos_p = pad_axis(masked_kv_pos(kv_pos, kv_valid), 1, block_k, POS_NEVER_VISIBLE)
    nq, nk = qp.shape[2] // block_q, kp.shape[2] // block_k
    # Flattened to 1-D: scalar-prefetch operands live in SMEM, where 2-D
    # arrays are padded heavily.
    k_min = kv_pos_p.reshape(b, nk, block_k).min(axis=-1).reshape(-1)
    q_max = q_pos_p.reshape(b, nq, block_q).max(axis=-1).reshape(-1)

    q_spec = pl.BlockSpec((None, None, block_q, d), lambda b_, h, i, j, *_: (b_, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, block_k, d),
        # lax.div, not //: floor division lowers to sign ops,
        # which Mosaic cannot lower without a TPU attached.
        lambda b_, h, i, j, *_: (b_, lax.div(h, group), j, 0),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hq, nq, nk),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, block_q, 1), lambda b_, h, i, j, *_: (b_, i, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b_, h, i, j, *_: (b_, 0, j)),
        ],
        out_specs=[
            q_spec,
            pl.BlockSpec((None, None, block_q, 1), lambda b_, h, i, j, *_: (b_, h, i, 0)),
        ],
        scratch_shapes=[
            vmem((block_q, 1), jnp.float32),
            vmem((block_q, 1), jnp.float32),
            vmem((block_q, d), jnp.float32),
        ],
    )
    limit = _vmem_limit(prefill_vmem_bytes(block_q, block_k, d, q.dtype))
    out, lse = pl.pallas_call(
        functools.partial(_prefill_kernel, scale=scale, num_q_blocks=nq, num_k_blocks=nk),
        grid_spec=grid_spec,
        out_shape=(jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, qp.shape[2], 1), jnp.float32)),
        compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary"), limit),
        interpret=interpret,
        name="qcache_flash_prefill",
    )(k_min, q_max, qp, kp, vp, q_pos_p[:, :, None], kv_pos_p[:, None, :])
    return out[:, :, :tq], lse[:, :, :tq, 0]


# ---------------------------------------------------------------- decode


def _kv_index_map(block_k):
    """Index map into the [B, Hkv, S, D] cache (grid: rows, head blocks, key
    blocks). Blocks past a row's length re-use the last needed block index,
    so the pipeline issues no DMA for them (the kernel skips their compute)."""

    def index_map(b, hh, j, len_ref):
        last = jnp.maximum(pl.cdiv(len_ref[b], block_k) - 1, 0)
        return b, hh, jnp.minimum(j, last), 0

    return index_map


def _decode_kernel(
    len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *rest, scale, heads_per_block, block_k, num_k_blocks, with_scores
):
    score_ref = rest[0] if with_scores else None
    m_sc, l_sc, acc_sc = rest[-3:]
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _visit():
        valid = (j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < length
        for h in range(heads_per_block):  # kv heads of this block, g query rows each
            s = _dot(q_ref[h], k_ref[h], DOT_NT) * scale  # [g, bk]
            s = jnp.where(valid, s, -jnp.inf)
            if with_scores:
                score_ref[h] = s
            # The block holds a valid key, so m_new is finite.
            m_prev = m_sc[h]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new)
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1, keepdims=True)
            acc_sc[h] = alpha * acc_sc[h] + _dot(p.astype(v_ref.dtype), v_ref[h], DOT_NN)
            m_sc[h] = m_new

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        inv_l, lse = softmax_finish(m_sc[...], l_sc[...])
        o_ref[...] = (acc_sc[...] * inv_l).astype(o_ref.dtype)
        lse_ref[...] = lse


def decode(q, k, v, lengths, *, scale=None, return_probs=False, interpret=False):
    """Decode attention over a head-major cache.

    q [B, Hq, D]; k/v [B, Hkv, S, D]; lengths int32 [B]. Grid (B, kv-head
    blocks, key blocks); q is viewed as [B, Hkv, g, D] (free reshape) so a
    block serves the g query heads of each of its kv heads.
    Returns (out, lse[, probs]).
    """
    b, hkv, s_len, d = k.shape
    hq = q.shape[1]
    g = hq // hkv
    scale = default_scale(d, scale)
    hb, block_k = decode_blocks(hkv, g, s_len, d, k.dtype, return_probs=return_probs)
    nk = s_len // block_k
    row_spec = pl.BlockSpec((None, hb, g, d), lambda b_, hh, j, *_: (b_, hh, 0, 0))
    kv_spec = pl.BlockSpec((None, hb, block_k, d), _kv_index_map(block_k))
    out_specs = [row_spec, pl.BlockSpec((None, hb, g, 1), lambda b_, hh, j, *_: (b_, hh, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, hkv, g, d), q.dtype), jax.ShapeDtypeStruct((b, hkv, g, 1), jnp.float32)]
    if return_probs:
        out_specs.append(pl.BlockSpec((None, hb, g, block_k), lambda b_, hh, j, *_: (b_, hh, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, g, s_len), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv // hb, nk),
        in_specs=[row_spec, kv_spec, kv_spec],
        out_specs=out_specs,
        scratch_shapes=[vmem((hb, g, 1), jnp.float32), vmem((hb, g, 1), jnp.float32), vmem((hb, g, d), jnp.float32)],
    )
    limit = _vmem_limit(decode_vmem_bytes(hb, g, block_k, d, k.dtype, return_probs=return_probs))
    res = pl.pallas_call(
        functools.partial(
            _decode_kernel,
            scale=scale,
            heads_per_block=hb,
            block_k=block_k,
            num_k_blocks=nk,
            with_scores=return_probs,
        ),
        grid_spec=grid_spec,
        out_shape=tuple(out_shape),
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary"), limit),
        interpret=interpret,
        name="qcache_decode",
    )(lengths, q.reshape(b, hkv, g, d), k, v)
    out, lse = res[0].reshape(b, hq, d), res[1].reshape(b, hq)
    if return_probs:
        return out, lse, probs_from_scores(res[2].reshape(b, hq, s_len), lse, lengths)
    return out, lse


def _lazy_pv_kernel(len_ref, p_ref, v_ref, o_ref, acc_sc, *, heads_per_block, block_k, num_k_blocks):
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _visit():
        valid = (j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < length
        for h in range(heads_per_block):
            p = jnp.where(valid, p_ref[h], 0.0)  # [g, bk]
            acc_sc[h] += _dot(p.astype(v_ref.dtype), v_ref[h], DOT_NN)

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        o_ref[...] = acc_sc[...].astype(o_ref.dtype)


def lazy_pv(probs, v, lengths, *, interpret=False):
    """GLA lazy decode: probs [B, Hq, S] @ V [B, Hkv, S, D], reading V only.

    Only keys j < lengths[b] are fetched; returns out [B, Hq, D] in v.dtype.
    """
    b, hkv, s_len, d = v.shape
    hq = probs.shape[1]
    g = hq // hkv
    hb, block_k = decode_blocks(hkv, g, s_len, d, v.dtype, lazy=True)
    nk = s_len // block_k
    kv_map = _kv_index_map(block_k)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hkv // hb, nk),
        in_specs=[
            pl.BlockSpec((None, hb, g, block_k), lambda b_, hh, j, ln: (b_, hh, 0, kv_map(b_, hh, j, ln)[2])),
            pl.BlockSpec((None, hb, block_k, d), kv_map),
        ],
        out_specs=pl.BlockSpec((None, hb, g, d), lambda b_, hh, j, *_: (b_, hh, 0, 0)),
        scratch_shapes=[vmem((hb, g, d), jnp.float32)],
    )
    limit = _vmem_limit(decode_vmem_bytes(hb, g, block_k, d, v.dtype, lazy=True))
    out = pl.pallas_call(
        functools.partial(_lazy_pv_kernel, heads_per_block=hb, block_k=block_k, num_k_blocks=nk),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, d), v.dtype),
        compiler_params=tpu_params(("parallel", "parallel", "arbitrary"), limit),
        interpret=interpret,
        name="qcache_lazy_pv",
    )(lengths, probs.astype(jnp.float32).reshape(b, hkv, g, s_len), v)
    return out.reshape(b, hq, d)
