"""Pallas TPU (Mosaic) kernels: position-masked prefill, decode over a stacked
KV cache, and the GLA lazy-layer P @ V decode.

Mosaic tiles refs through BlockSpecs (HBM -> VMEM pipelining), so the layer of
a stacked cache and the per-row lengths are scalar-prefetch arguments read by
the index maps: the kernel DMAs blocks of layer `layer` straight out of the
stacked cache (no XLA slice) and stops fetching past each row's length.
Decode views the cache as [L, B, S, Hkv*D] (a free reshape) so that a block's
last two dims (keys, Hkv*D) are TPU-tileable whatever Hkv is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import pl, pltpu, tpu_params, vmem
from .common import (
    POS_NEVER_VISIBLE,
    POS_SEES_NOTHING,
    as_stacked,
    largest_dividing_block,
    masked_kv_pos,
    pad_axis,
    probs_from_scores,
)
from .reference import default_scale

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    # f32 inputs: full-precision MXU passes (the default may use bf16 passes).
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


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
        s = _dot(q_ref[...], k_ref[...], _NT) * scale  # [bq, bk]
        s = jnp.where(kpos_ref[...] <= qpos_ref[...], s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Rows with nothing visible yet keep m = -inf; shift by 0 to avoid NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...], _NN)
        m_sc[...] = m_new

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        l = l_sc[...]
        has_keys = l > 0
        l_safe = jnp.where(has_keys, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_keys, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def prefill(q, k, v, q_pos, kv_pos, kv_valid, *, scale=None, interpret=False, block_q=128, block_k=128):
    """Flash attention with position masks and GQA (see reference_attention).

    Heads are moved next to batch ([B, H, T, D]) so that blocks are (rows, D)
    tiles for any head_dim; Tq is padded to a multiple of 8 / block_q and Tk
    to block_k (a multiple of 128, the lane width of the kv-position block).
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = default_scale(d, scale)
    block_q = min(block_q, -(-tq // 8) * 8)
    qp = pad_axis(q, 1, block_q, 0).transpose(0, 2, 1, 3)
    kp = pad_axis(k, 1, block_k, 0).transpose(0, 2, 1, 3)
    vp = pad_axis(v, 1, block_k, 0).transpose(0, 2, 1, 3)
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
    out, lse = pl.pallas_call(
        functools.partial(_prefill_kernel, scale=scale, num_q_blocks=nq, num_k_blocks=nk),
        grid_spec=grid_spec,
        out_shape=(jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, qp.shape[2], 1), jnp.float32)),
        compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="qcache_flash_prefill",
    )(k_min, q_max, qp, kp, vp, q_pos_p[:, :, None], kv_pos_p[:, None, :])
    return (out.transpose(0, 2, 1, 3)[:, :tq], lse[..., 0].transpose(0, 2, 1)[:, :tq])


# ---------------------------------------------------------------- decode


def _decode_block(s_len):
    # Multiples of 128 keep the score block lane-dense; else one block.
    block = largest_dividing_block(s_len, (512, 256, 128))
    return s_len if block is None else block


def _kv_index_map(block_k):
    """Index map into the [L, B, S, Hkv*D] cache view.

    Blocks past a row's length re-use the last needed block index, so the
    pipeline issues no DMA for them (the kernel skips their compute).
    """

    def index_map(b, j, layer_ref, len_ref):
        last = jnp.maximum(pl.cdiv(len_ref[b], block_k) - 1, 0)
        return layer_ref[0], b, jnp.minimum(j, last), 0

    return index_map


def _decode_kernel(
    layer_ref,
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *rest,
    scale,
    kv_heads,
    group,
    head_dim,
    block_k,
    num_k_blocks,
    with_scores,
):
    score_ref = rest[0] if with_scores else None
    m_sc, l_sc, acc_sc = rest[-3:]
    b, j = pl.program_id(0), pl.program_id(1)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _visit():
        valid = (j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < length
        for hk in range(kv_heads):
            rows = pl.ds(hk * group, group)
            cols = pl.ds(hk * head_dim, head_dim)
            s = _dot(q_ref[rows, :], k_ref[:, cols], _NT) * scale  # [g, bk]
            s = jnp.where(valid, s, -jnp.inf)
            if with_scores:
                score_ref[rows, :] = s
            # The block holds a valid key, so m_new is finite.
            m_prev = m_sc[rows, :]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new)
            l_sc[rows, :] = alpha * l_sc[rows, :] + jnp.sum(p, axis=1, keepdims=True)
            acc_sc[rows, :] = alpha * acc_sc[rows, :] + _dot(p.astype(v_ref.dtype), v_ref[:, cols], _NN)
            m_sc[rows, :] = m_new

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        l = l_sc[...]
        has_keys = l > 0
        l_safe = jnp.where(has_keys, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_keys, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def decode(q, k, v, lengths, *, layer=None, scale=None, return_probs=False, interpret=False):
    """Decode attention reading layer `layer` of a stacked cache in place.

    q [B, Hq, D]; k/v [B, S, Hkv, D] (layer None) or [L, B, S, Hkv, D];
    lengths int32 [B]. Returns (out, lse[, probs]).
    """
    layer_arr, k, v = as_stacked(layer, k, v)
    n_layers, b, s_len, hkv, d = k.shape
    hq = q.shape[1]
    scale = default_scale(d, scale)
    block_k = _decode_block(s_len)
    nk = s_len // block_k
    k = k.reshape(n_layers, b, s_len, hkv * d)
    v = v.reshape(n_layers, b, s_len, hkv * d)
    kv_spec = pl.BlockSpec((None, None, block_k, hkv * d), _kv_index_map(block_k))
    row_spec = pl.BlockSpec((None, hq, d), lambda b_, j, *_: (b_, 0, 0))
    out_specs = [row_spec, pl.BlockSpec((None, hq, 1), lambda b_, j, *_: (b_, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, hq, d), q.dtype), jax.ShapeDtypeStruct((b, hq, 1), jnp.float32)]
    if return_probs:
        out_specs.append(pl.BlockSpec((None, hq, block_k), lambda b_, j, *_: (b_, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, hq, s_len), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, nk),
        in_specs=[row_spec, kv_spec, kv_spec],
        out_specs=out_specs,
        scratch_shapes=[vmem((hq, 1), jnp.float32), vmem((hq, 1), jnp.float32), vmem((hq, d), jnp.float32)],
    )
    lengths = lengths.astype(jnp.int32)
    res = pl.pallas_call(
        functools.partial(
            _decode_kernel,
            scale=scale,
            kv_heads=hkv,
            group=hq // hkv,
            head_dim=d,
            block_k=block_k,
            num_k_blocks=nk,
            with_scores=return_probs,
        ),
        grid_spec=grid_spec,
        out_shape=tuple(out_shape),
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="qcache_decode",
    )(layer_arr, lengths, q, k, v)
    out, lse = res[0], res[1][..., 0]
    if return_probs:
        return out, lse, probs_from_scores(res[2], lse, lengths)
    return out, lse


def _lazy_pv_kernel(
    layer_ref, len_ref, p_ref, v_ref, o_ref, acc_sc, *, kv_heads, group, head_dim, block_k, num_k_blocks
):
    b, j = pl.program_id(0), pl.program_id(1)
    length = len_ref[b]

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _visit():
        valid = (j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < length
        for hk in range(kv_heads):
            rows = pl.ds(hk * group, group)
            p = jnp.where(valid, p_ref[rows, :], 0.0)
            acc_sc[rows, :] += _dot(p.astype(v_ref.dtype), v_ref[:, pl.ds(hk * head_dim, head_dim)], _NN)

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        o_ref[...] = acc_sc[...].astype(o_ref.dtype)


def lazy_pv(probs, v, lengths, *, layer=None, interpret=False):
    """GLA lazy decode: probs [B, Hq, S] @ V of one (stacked) layer, V only.

    Only keys j < lengths[b] are fetched; returns out [B, Hq, D] in v.dtype.
    """
    layer_arr, v = as_stacked(layer, v)
    n_layers, b, s_len, hkv, d = v.shape
    hq = probs.shape[1]
    block_k = _decode_block(s_len)
    nk = s_len // block_k
    v = v.reshape(n_layers, b, s_len, hkv * d)
    kv_map = _kv_index_map(block_k)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, nk),
        in_specs=[
            pl.BlockSpec((None, hq, block_k), lambda b_, j, ly, ln: (b_, 0, kv_map(b_, j, ly, ln)[2])),
            pl.BlockSpec((None, None, block_k, hkv * d), kv_map),
        ],
        out_specs=pl.BlockSpec((None, hq, d), lambda b_, j, *_: (b_, 0, 0)),
        scratch_shapes=[vmem((hq, d), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_lazy_pv_kernel, kv_heads=hkv, group=hq // hkv, head_dim=d, block_k=block_k, num_k_blocks=nk),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hq, d), v.dtype),
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=interpret,
        name="qcache_lazy_pv",
    )(layer_arr, lengths.astype(jnp.int32), probs.astype(jnp.float32), v)
