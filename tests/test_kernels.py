"""Kernel tests: every Pallas kernel (interpreted on CPU) against the one
reference, `reference_attention`, which is itself checked against numpy.

Tolerances (max abs error, values are O(1)): f32 2e-5 abs + 1e-4 rel;
bf16 2e-2 abs + 2e-2 rel (the kernels round probabilities to bf16 before
P @ V, as flash attention does; the reference does not).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcache_jax.kernels import gpu, tpu
from qcache_jax.kernels._compat import tpu_interpret
from qcache_jax.kernels import (
    decode_attention,
    flash_attention,
    lazy_decode_pv,
    merge_attention,
    reference_attention,
    resolve_impl,
)

INTERPRET = ("pallas_gpu_interpret", "pallas_tpu_interpret")
ALL_IMPLS = ("xla",) + INTERPRET
TOL = {jnp.float32: dict(atol=2e-5, rtol=1e-4), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LSE_TOL = {jnp.float32: dict(atol=1e-4, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=1e-3)}


def _close(x, y, dtype, tol=TOL):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol[dtype])


def _close_lse(x, y, dtype):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))
    _close(np.where(np.isneginf(y), 0, x), np.where(np.isneginf(y), 0, y), dtype, LSE_TOL)


def _prefill_inputs(seed, b, tq, tk, hq, hkv, d, dtype, q_offset=None):
    """Random q/k/v; queries sit at the last tq of tk positions (causal), keys
    are randomly invalid (ragged), row 0 has padded (invisible) trailing keys
    and, if tq > 1, a padded query (position -1) that must see nothing."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, tq, hq, d), (b, tk, hkv, d), (b, tk, hkv, d)))
    q_offset = tk - tq if q_offset is None else q_offset
    q_pos = np.tile(np.arange(tq) + q_offset, (b, 1))
    kv_pos = np.tile(np.arange(tk), (b, 1))
    kv_valid = rng.random((b, tk)) > 0.25
    kv_valid[0, tk - tk // 4 :] = False
    if tq > 1:
        q_pos[0, -1] = -1
    return q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32), jnp.asarray(kv_valid)


# ------------------------------------------------------------- reference


def _numpy_attention(q, k, v, q_pos, kv_pos, kv_valid, scale):
    """Independent float64 loop formula (no shared code with the package)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros((b, tq, hq, d))
    lse = np.full((b, tq, hq), -np.inf)
    for bi in range(b):
        for i in range(tq):
            vis = np.asarray(kv_valid[bi]) & (np.asarray(kv_pos[bi]) <= int(q_pos[bi, i]))
            if not vis.any():
                continue
            for h in range(hq):
                s = k[bi, vis, h // g] @ q[bi, i, h] * scale
                mx = s.max()
                w = np.exp(s - mx)
                out[bi, i, h] = w @ v[bi, vis, h // g] / w.sum()
                lse[bi, i, h] = mx + np.log(w.sum())
    return out, lse


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (8, 2, 80), (8, 1, 32)])
def test_reference_matches_numpy(hq, hkv, d):
    args = _prefill_inputs(0, 2, 5, 9, hq, hkv, d, jnp.float32)
    out, lse = reference_attention(*args, scale=0.3)
    ref_out, ref_lse = _numpy_attention(*args, scale=0.3)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    _close_lse(lse, ref_lse, jnp.float32)
    # The padded query (row 0, last) sees nothing: exactly 0, lse -inf.
    assert np.all(np.asarray(out)[0, -1] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, -1]))


def test_resolve_impl():
    assert resolve_impl("auto") == {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")
    with pytest.raises(ValueError):
        resolve_impl("triton")


# ------------------------------------------------------------- prefill

# (b, tq, tk, hq, hkv, d): GQA ratios 1, 4, 8; head_dim 64, 80, 128; Tq < Tk
# and Tq == Tk; lengths that are not block multiples.
PREFILL_CASES = [
    (2, 24, 40, 2, 2, 64),
    (1, 17, 33, 4, 1, 80),
    (2, 16, 16, 8, 1, 128),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_prefill_matches_reference(impl, case, dtype):
    args = _prefill_inputs(1, *case, dtype)
    out, lse = flash_attention(*args, impl=impl)
    ref_out, ref_lse = reference_attention(*args)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert out.shape == args[0].shape and lse.shape == args[0].shape[:3]
    _close(out, ref_out, dtype)
    _close_lse(lse, ref_lse, dtype)


@pytest.mark.parametrize("shuffle_keys", [False, True])
@pytest.mark.parametrize(
    "kernel,interpret,blocks",
    [(gpu.prefill, True, dict(block_q=16, block_k=16)), (tpu.prefill, tpu_interpret(), dict(block_q=32, block_k=128))],
    ids=["gpu", "tpu"],
)
def test_prefill_many_blocks(kernel, interpret, blocks, shuffle_keys):
    """Small blocks: several query and key blocks, so the online softmax
    spans blocks and key blocks entirely after a query block are skipped
    (by position, also when the key order is shuffled)."""
    q, k, v, q_pos, kv_pos, kv_valid = _prefill_inputs(9, 1, 260, 260, 2, 1, 64, jnp.float32)
    if shuffle_keys:
        perm = np.random.default_rng(9).permutation(260)
        k, v, kv_pos, kv_valid = (x[:, perm] for x in (k, v, kv_pos, kv_valid))
    out, lse = jax.jit(lambda *a: kernel(*a, interpret=interpret, **blocks))(q, k, v, q_pos, kv_pos, kv_valid)
    ref_out, ref_lse = reference_attention(q, k, v, q_pos, kv_pos, kv_valid)
    _close(out, ref_out, jnp.float32)
    _close_lse(lse, ref_lse, jnp.float32)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_prefill_rows_without_keys_are_zero(impl):
    q, k, v, q_pos, kv_pos, kv_valid = _prefill_inputs(2, 2, 8, 16, 4, 2, 64, jnp.float32)
    kv_valid = kv_valid.at[1].set(False)  # row 1: no valid key at all
    q_pos = q_pos.at[0, :3].set(-5)  # before every key position
    out, lse = flash_attention(q, k, v, q_pos, kv_pos, kv_valid, impl=impl)
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))
    assert np.all(out[0, :3] == 0) and np.all(np.isneginf(lse[0, :3]))
    assert np.all(np.isfinite(lse[0, 3:-1]))  # [0, -1] is a padded query


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_segment_merge_is_exact(impl):
    """Visual keys and text keys attended separately (in shuffled key order)
    and merged equal one pass over all keys."""
    b, t, hq, hkv, d = 2, 24, 4, 2, 64
    q, k, v, q_pos, kv_pos, kv_valid = _prefill_inputs(3, b, t, t, hq, hkv, d, jnp.float32)
    perm = np.random.default_rng(3).permutation(t)
    k, v, kv_pos, kv_valid = k[:, perm], v[:, perm], kv_pos[:, perm], kv_valid[:, perm]
    vis, txt = slice(0, 10), slice(10, t)
    seg = [flash_attention(q, k[:, s], v[:, s], q_pos, kv_pos[:, s], kv_valid[:, s], impl=impl) for s in (vis, txt)]
    out, lse = merge_attention([o for o, _ in seg], [l for _, l in seg])
    ref_out, ref_lse = reference_attention(q, k, v, q_pos, kv_pos, kv_valid)
    _close(out, ref_out, jnp.float32)
    _close_lse(lse, ref_lse, jnp.float32)
    # Early queries see no visual key at all for some rows: -inf segments.
    assert np.isneginf(np.asarray(seg[0][1])).any()


def test_merge_all_segments_empty():
    out = jnp.ones((2, 3, 8))
    lse = jnp.full((2, 3), -jnp.inf)
    merged, merged_lse = merge_attention([out, out], [lse, lse])
    assert np.all(np.asarray(merged) == 0)
    assert np.all(np.isneginf(np.asarray(merged_lse)))


# ------------------------------------------------------------- decode

# (b, s, hq, hkv, d, lengths): ragged lengths incl. 0 and the full cache.
DECODE_CASES = [
    (3, 128, 2, 2, 64, (128, 37, 0)),
    (2, 384, 8, 2, 80, (300, 1)),
    (2, 128, 8, 1, 128, (5, 128)),
]


def _decode_inputs(seed, b, s, hq, hkv, d, dtype, layers=None):
    rng = np.random.default_rng(seed)
    kv_shape = (b, s, hkv, d) if layers is None else (layers, b, s, hkv, d)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, hq, d), kv_shape, kv_shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_decode_matches_reference(impl, case, dtype):
    b, s, hq, hkv, d, lengths = case
    q, k, v = _decode_inputs(4, b, s, hq, hkv, d, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = decode_attention(q, k, v, lengths, impl=impl)
    # The same decode written as prefill: one query per row at position 0,
    # all keys at position 0, validity from the lengths.
    kv_valid = jnp.arange(s)[None, :] < lengths[:, None]
    zeros = jnp.zeros((b, s), jnp.int32)
    ref_out, ref_lse = reference_attention(q[:, None], k, v, zeros[:, :1], zeros, kv_valid)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, hq)
    _close(out, ref_out[:, 0], dtype)
    _close_lse(lse, ref_lse[:, 0], dtype)
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out)[empty] == 0)
    assert not np.isnan(np.asarray(out)).any()


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_decode_stacked_layer_reads_that_layer(impl):
    """A traced layer index selects the right layer of a stacked cache."""
    b, s, hq, hkv, d, layers = 2, 384, 4, 2, 64, 3
    q, k, v = _decode_inputs(5, b, s, hq, hkv, d, jnp.float32, layers)
    lengths = jnp.asarray([100, 384], jnp.int32)
    step = jax.jit(lambda layer: decode_attention(q, k, v, lengths, layer=layer, impl=impl))
    for layer in range(layers):
        out, lse = step(jnp.int32(layer))
        ref_out, ref_lse = decode_attention(q, k[layer], v[layer], lengths, impl="xla")
        _close(out, ref_out, jnp.float32)
        _close_lse(lse, ref_lse, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_gla_probs_times_v_equals_decode(impl, dtype):
    """The anchor's probabilities reproduce its output through lazy_decode_pv,
    and reused with another layer's V give that layer's GLA output."""
    b, s, hq, hkv, d, layers = 2, 384, 8, 2, 80, 2
    q, k, v = _decode_inputs(6, b, s, hq, hkv, d, dtype, layers)
    lengths = jnp.asarray([131, 0], jnp.int32)
    anchor = jnp.int32(0)
    out, lse, probs = decode_attention(q, k, v, lengths, layer=anchor, impl=impl, return_probs=True)
    ref = decode_attention(q, k[0], v[0], lengths, impl="xla", return_probs=True)
    assert probs.shape == (b, hq, s) and probs.dtype == jnp.float32
    _close(probs, ref[2], dtype)
    assert np.all(np.asarray(probs)[:, :, 131:] == 0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1)[0], 1.0, rtol=1e-5)
    same = lazy_decode_pv(probs, v, lengths=lengths, layer=anchor, impl=impl)
    _close(same, out, dtype)
    lazy = lazy_decode_pv(probs, v, lengths=lengths, layer=jnp.int32(1), impl=impl)
    gla_ref = jnp.einsum("bhs,bshd->bhd", ref[2], jnp.repeat(v[1].astype(jnp.float32), hq // hkv, 2))
    _close(lazy, gla_ref, dtype)
    # Without lengths every key is read; probs are 0 there, same result.
    _close(lazy_decode_pv(probs, v[1], impl=impl), lazy, dtype)


# ------------------------------------------------------------- lowering

LOWER_ARGS = dict(b=2, tq=100, tk=256, hq=8, hkv=2, s=1024, layers=3)


def _lowering_calls(impl, d, dtype):
    c = LOWER_ARGS
    f = jax.ShapeDtypeStruct
    i32 = jnp.int32
    prefill_args = (
        f((c["b"], c["tq"], c["hq"], d), dtype),
        f((c["b"], c["tk"], c["hkv"], d), dtype),
        f((c["b"], c["tk"], c["hkv"], d), dtype),
        f((c["b"], c["tq"]), i32),
        f((c["b"], c["tk"]), i32),
        f((c["b"], c["tk"]), jnp.bool_),
    )
    cache = f((c["layers"], c["b"], c["s"], c["hkv"], d), dtype)
    lengths, layer = f((c["b"],), i32), f((), i32)
    return [
        (lambda *a: flash_attention(*a, impl=impl), prefill_args),
        (
            lambda q, k, v, n, l: decode_attention(q, k, v, n, layer=l, impl=impl, return_probs=True),
            (f((c["b"], c["hq"], d), dtype), cache, cache, lengths, layer),
        ),
        (
            lambda p, v, n, l: lazy_decode_pv(p, v, lengths=n, layer=l, impl=impl),
            (f((c["b"], c["hq"], c["s"]), jnp.float32), cache, lengths, layer),
        ),
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_kernels_lower_for_device(impl, platform, d, dtype):
    """Cross-lowering without a device: runs the Pallas Triton / Mosaic
    lowering (e.g. Triton's power-of-two tile rule) on CPU. Device compilation
    itself is only covered by the device tests below."""
    for fn, args in _lowering_calls(impl, d, dtype):
        jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


# ------------------------------------------------------------- on device

_DEVICE_IMPL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())


@pytest.mark.skipif(_DEVICE_IMPL is None, reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_on_device_matches_reference(d, dtype):
    args = _prefill_inputs(7, 2, 300, 700, 8, 2, d, dtype)
    out, lse = flash_attention(*args, impl=_DEVICE_IMPL)
    ref_out, ref_lse = reference_attention(*args)
    _close(out, ref_out, dtype)
    _close_lse(lse, ref_lse, dtype)
    q, k, v = _decode_inputs(8, 2, 2048, 8, 2, d, dtype, layers=2)
    lengths = jnp.asarray([2048, 999], jnp.int32)
    out, lse, probs = decode_attention(q, k, v, lengths, layer=jnp.int32(1), impl=_DEVICE_IMPL, return_probs=True)
    ref = decode_attention(q, k[1], v[1], lengths, impl="xla", return_probs=True)
    _close(out, ref[0], dtype)
    _close_lse(lse, ref[1], dtype)
    _close(probs, ref[2], dtype)
    lazy = lazy_decode_pv(probs, v, lengths=lengths, layer=jnp.int32(1), impl=_DEVICE_IMPL)
    _close(lazy, out, dtype)
