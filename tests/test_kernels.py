"""Kernel tests: every implementation ("xla", and the Pallas GPU / TPU
kernels interpreted on CPU) against an independent float64 numpy oracle
written here (no code shared with the package).

Layout (head-major): prefill q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D];
decode q [B, Hq, D], cache [B, Hkv, S, D].

Tolerances (max abs error, values are O(1)): f32 2e-5 abs + 1e-4 rel;
bf16 2e-2 abs + 2e-2 rel (the kernels round probabilities to bf16 before
P @ V, as flash attention does; the oracle does not).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_check import large_moves

from qcache_jax.kernels import (
    decode_attention,
    flash_attention,
    gpu,
    lazy_decode_pv,
    merge_attention,
    reference_attention,
    resolve_impl,
    tpu,
    xla,
)
from qcache_jax.kernels._compat import tpu_interpret

INTERPRET = ("pallas_gpu_interpret", "pallas_tpu_interpret")
ALL_IMPLS = ("xla",) + INTERPRET
TOL = {jnp.float32: dict(atol=2e-5, rtol=1e-4), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LSE_TOL = {jnp.float32: dict(atol=1e-4, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=1e-3)}


def _close(x, y, dtype, tol=TOL):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **tol[dtype])


def _close_lse(x, y, dtype):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))
    _close(np.where(np.isneginf(y), 0, x), np.where(np.isneginf(y), 0, y), dtype, LSE_TOL)


# ------------------------------------------------------------- numpy oracle


def np_attention(q, k, v, q_pos, kv_pos, kv_valid, scale=None, q_seg=None, kv_seg=None):
    """Independent float64 attention: per (row, head) softmax over the
    visible keys (with segments: also kv_seg 0 or the query's segment). Returns
    out [B, Hq, Tq, D], lse [B, Hq, Tq] (-inf with no visible key, out 0 there)
    and probs [B, Hq, Tq, Tk]."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    q_pos, kv_pos, kv_valid = (np.asarray(x) for x in (q_pos, kv_pos, kv_valid))
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros(q.shape)
    lse = np.full((b, hq, tq), -np.inf)
    probs = np.zeros((b, hq, tq, k.shape[2]))
    for bi in range(b):
        vis = kv_valid[bi][None, :] & (kv_pos[bi][None, :].astype(np.int64) <= q_pos[bi][:, None])
        if kv_seg is not None:
            ks, qs = np.asarray(kv_seg)[bi], np.asarray(q_seg)[bi]
            vis &= (ks[None, :] == qs[:, None]) | (ks[None, :] == 0)
        rows = vis.any(axis=1)
        for h in range(hq):
            s = np.where(vis, q[bi, h] @ k[bi, h // g].T * scale, -np.inf)
            mx = np.where(rows, s.max(axis=1), 0.0)[:, None]
            w = np.where(vis, np.exp(s - mx), 0.0)
            tot = w.sum(axis=1, keepdims=True)
            p = np.divide(w, tot, out=np.zeros_like(w), where=tot > 0)
            probs[bi, h] = p
            out[bi, h] = p @ v[bi, h // g]
            lse[bi, h] = np.where(rows, mx[:, 0] + np.log(np.where(rows, tot[:, 0], 1.0)), -np.inf)
    return out, lse, probs


def np_decode(q, k, v, lengths):
    b, s = k.shape[0], k.shape[2]
    zeros = np.zeros((b, s), np.int32)
    valid = np.arange(s)[None, :] < np.asarray(lengths)[:, None]
    out, lse, probs = np_attention(np.asarray(jnp.asarray(q, jnp.float32))[:, :, None], k, v, zeros[:, :1], zeros, valid)
    return out[:, :, 0], lse[:, :, 0], probs[:, :, 0]


def _prefill_inputs(seed, b, tq, tk, hq, hkv, d, dtype, q_offset=None, ramp=0.0):
    """Random q/k/v; queries sit at the last tq of tk positions (causal), keys
    are randomly invalid (ragged), row 0 has padded (invisible) trailing keys
    and, if tq > 1, a padded query (position -1) that must see nothing.

    ramp > 0 makes scores grow with the key position (q has a positive mean,
    k a position-proportional offset), so the running max of an online
    softmax rises from key block to key block: dropping the exp(m_old - m_new)
    rescale then gives a large error."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, tq, d))
    k = rng.standard_normal((b, hkv, tk, d))
    v = rng.standard_normal((b, hkv, tk, d))
    if ramp:
        q = 1.0 + 0.3 * q
        k = 0.5 * k + ramp / np.sqrt(d) * (np.arange(tk) / tk)[:, None]
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    q_offset = tk - tq if q_offset is None else q_offset
    q_pos = np.tile(np.arange(tq) + q_offset, (b, 1))
    kv_pos = np.tile(np.arange(tk), (b, 1))
    kv_valid = rng.random((b, tk)) > 0.25
    kv_valid[0, tk - tk // 4 :] = False
    if tq > 1:
        q_pos[0, -1] = -1
    return q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32), jnp.asarray(kv_valid)


def _check_prefill(out, lse, args, dtype):
    ref_out, ref_lse, _ = np_attention(*args)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert out.shape == args[0].shape and lse.shape == args[0].shape[:3]
    assert not np.isnan(np.asarray(out, np.float32)).any()
    _close(out, ref_out, dtype)
    _close_lse(lse, ref_lse, dtype)


# ------------------------------------------------------------- reference


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (8, 2, 80), (8, 1, 32)])
def test_reference_matches_numpy(hq, hkv, d):
    args = _prefill_inputs(0, 2, 5, 9, hq, hkv, d, jnp.float32)
    out, lse, probs = reference_attention(*args, scale=0.3, return_probs=True)
    ref_out, ref_lse, ref_probs = np_attention(*args, scale=0.3)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
    _close_lse(lse, ref_lse, jnp.float32)
    # The padded query (row 0, last) sees nothing: exactly 0, lse -inf.
    assert np.all(np.asarray(out)[0, :, -1] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, -1]))


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
def test_prefill_matches_numpy(impl, case, dtype):
    args = _prefill_inputs(1, *case, dtype)
    out, lse = flash_attention(*args, impl=impl)
    _check_prefill(out, lse, args, dtype)


def _xla_blocked(*args, **blocks):
    return xla.prefill_blocked(*args, **blocks)


# Small blocks so that Tq and Tk span several blocks of every kernel. The TPU
# kernel's key blocks are multiples of 128 (lane width of the position block).
MULTI_BLOCK = {
    "xla": (_xla_blocked, None, dict(block_q=16, block_k=32), (1, 40, 150)),
    "gpu": (gpu.prefill, True, dict(block_q=16, block_k=16), (1, 40, 72)),
    "tpu": (tpu.prefill, "tpu", dict(block_q=16, block_k=128), (1, 40, 300)),
}


def _run_blocked(kernel, interpret, blocks, args):
    extra = {} if interpret is None else dict(interpret=tpu_interpret() if interpret == "tpu" else interpret)
    return jax.jit(lambda *a: kernel(*a, **extra, **blocks))(*args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("d", [80, 128])
@pytest.mark.parametrize("which", list(MULTI_BLOCK))
def test_prefill_many_blocks(which, d, dtype):
    """Several query and key blocks per kernel, with scores that rise along
    the keys: the online-softmax rescale is exercised at every block (this
    test fails if exp(m_old - m_new) is dropped), with a padded query and
    ragged keys; GQA 2."""
    kernel, interpret, blocks, (b, tq, tk) = MULTI_BLOCK[which]
    args = _prefill_inputs(9, b, tq, tk, 4, 2, d, dtype, ramp=8.0)
    out, lse = _run_blocked(kernel, interpret, blocks, args)
    _check_prefill(out, lse, args, dtype)


@pytest.mark.parametrize("which", list(MULTI_BLOCK))
def test_prefill_many_blocks_shuffled_keys(which):
    """Shuffled key order: blocks are skipped by position, not index, and the
    running max moves non-monotonically."""
    kernel, interpret, blocks, (b, tq, tk) = MULTI_BLOCK[which]
    q, k, v, q_pos, kv_pos, kv_valid = _prefill_inputs(10, 2, tq, tk, 2, 1, 64, jnp.float32, ramp=4.0)
    perm = np.random.default_rng(10).permutation(tk)
    k, v = k[:, :, perm], v[:, :, perm]
    kv_pos, kv_valid = kv_pos[:, perm], kv_valid[:, perm]
    args = (q, k, v, q_pos, kv_pos, kv_valid)
    out, lse = _run_blocked(kernel, interpret, blocks, args)
    _check_prefill(out, lse, args, jnp.float32)


def test_xla_prefill_long_sequence_uses_blocked_path():
    """Above DIRECT_MAX_TK the xla dispatch takes the blocked path: no
    [.., Tq, Tk] score array in the compiled HLO (the direct formula has
    one), and it stays exact."""
    tq, tk = xla.PREFILL_BLOCK_Q + 44, 2 * xla.PREFILL_BLOCK_K + 64
    assert tk > xla.DIRECT_MAX_TK
    args = _prefill_inputs(11, 1, tq, tk, 2, 1, 64, jnp.float32)
    blocked = jax.jit(lambda *a: flash_attention(*a, impl="xla")).lower(*args).compile().as_text()
    direct = jax.jit(lambda *a: reference_attention(*a)).lower(*args).compile().as_text()
    assert f"{tq},{tk}]" in direct and f"{tq},{tk}]" not in blocked
    out, lse = flash_attention(*args, impl="xla")
    _check_prefill(out, lse, args, jnp.float32)


@pytest.mark.parametrize("layout", ["contiguous", "prefix", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 8), (8, 32)])
def test_xla_blocked_prefill_with_segments_matches_numpy(layout, causal, blocks):
    """Packed segments through the blocked path (a vision tower's images and windows: contiguous
    runs, bidirectional; a packed text row: a shared prefix in segment 0 then per-sequence
    segments, causal; arbitrary ids), with invalid keys and rows that see nothing."""
    rng = np.random.default_rng(hash((layout, causal, blocks)) % 2**32)
    b, hq, hkv, t, d = 2, 4, 2, 77, 16
    q = jnp.asarray(rng.standard_normal((b, hq, t, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32)
    if layout == "contiguous":
        seg = np.repeat(np.arange(1, 8), [5, 13, 1, 20, 16, 9, 13])[None].repeat(b, 0)
    elif layout == "prefix":
        seg = np.concatenate([np.zeros(10, int), np.repeat(np.arange(1, 5), [17, 20, 15, 15])])[None].repeat(b, 0)
    else:
        seg = rng.integers(0, 6, size=(b, t))
    pos = np.broadcast_to(np.arange(t), (b, t)) if causal else np.zeros((b, t), int)
    valid = rng.random((b, t)) > 0.15
    valid[1, 20:40] = False  # a stretch with no valid key
    args = (jnp.asarray(pos, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(valid))
    seg = jnp.asarray(seg, jnp.int32)
    out, lse = xla.prefill_blocked(q, k, v, *args, q_seg=seg, kv_seg=seg, block_q=blocks[0], block_k=blocks[1])
    want_out, want_lse, _ = np_attention(q, k, v, pos, pos, valid, q_seg=np.asarray(seg), kv_seg=np.asarray(seg))
    _close(out, want_out, jnp.float32)
    _close_lse(lse, want_lse, jnp.float32)
    # the dispatcher's XLA path takes the blocked kernel for packed segments past DIRECT_MAX_TK
    out2, _ = flash_attention(q, k, v, *args, q_seg=seg, kv_seg=seg, impl="xla")
    _close(out2, want_out, jnp.float32)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_prefill_rows_without_keys_are_zero(impl):
    q, k, v, q_pos, kv_pos, kv_valid = _prefill_inputs(2, 2, 8, 16, 4, 2, 64, jnp.float32)
    kv_valid = kv_valid.at[1].set(False)  # row 1: no valid key at all
    q_pos = q_pos.at[0, :3].set(-5)  # before every key position
    out, lse = flash_attention(q, k, v, q_pos, kv_pos, kv_valid, impl=impl)
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1]))
    assert np.all(out[0, :, :3] == 0) and np.all(np.isneginf(lse[0, :, :3]))
    assert np.all(np.isfinite(lse[0, :, 3:-1]))  # [0, :, -1] is a padded query
    _check_prefill(out, lse, (q, k, v, q_pos, kv_pos, kv_valid), jnp.float32)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_segment_merge_is_exact(impl):
    """Visual keys and text keys attended separately (in shuffled key order)
    and merged equal one pass over all keys."""
    b, t, hq, hkv, d = 2, 24, 4, 2, 64
    q, k, v, q_pos, kv_pos, kv_valid = _prefill_inputs(3, b, t, t, hq, hkv, d, jnp.float32)
    perm = np.random.default_rng(3).permutation(t)
    k, v, kv_pos, kv_valid = k[:, :, perm], v[:, :, perm], kv_pos[:, perm], kv_valid[:, perm]
    vis, txt = slice(0, 10), slice(10, t)
    seg = [
        flash_attention(q, k[:, :, s], v[:, :, s], q_pos, kv_pos[:, s], kv_valid[:, s], impl=impl) for s in (vis, txt)
    ]
    out, lse = merge_attention([o for o, _ in seg], [l for _, l in seg])
    _check_prefill(out, lse, (q, k, v, q_pos, kv_pos, kv_valid), jnp.float32)
    # Early queries see no visual key at all for some rows: -inf segments.
    assert np.isneginf(np.asarray(seg[0][1])).any()


def test_merge_all_segments_empty():
    out = jnp.ones((2, 3, 8))
    lse = jnp.full((2, 3), -jnp.inf)
    merged, merged_lse = merge_attention([out, out], [lse, lse])
    assert np.all(np.asarray(merged) == 0)
    assert np.all(np.isneginf(np.asarray(merged_lse)))


# ------------------------------------------------------------- decode

# (b, s, hq, hkv, d, lengths): GQA 1, 4, 8; ragged lengths incl. 0 and the
# full cache; S spans several key blocks of the GPU (64) and TPU (128) kernels.
DECODE_CASES = [
    (3, 128, 2, 2, 64, (128, 37, 0)),
    (2, 384, 8, 2, 80, (300, 1)),
    (2, 256, 8, 1, 128, (5, 256)),
]


def _decode_inputs(seed, b, s, hq, hkv, d, dtype, ramp=0.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, d))
    k = rng.standard_normal((b, hkv, s, d))
    if ramp:
        q = 1.0 + 0.3 * q
        k = 0.5 * k + ramp / np.sqrt(d) * (np.arange(s) / s)[:, None]
    v = rng.standard_normal((b, hkv, s, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_decode_matches_numpy(impl, case, dtype):
    """Output, lse and probabilities vs numpy; the GLA lazy P @ V of the
    probabilities with the same V reproduces the output, and with another
    layer's V matches numpy."""
    b, s, hq, hkv, d, lengths = case
    q, k, v = _decode_inputs(4, b, s, hq, hkv, d, dtype, ramp=6.0)
    v2 = _decode_inputs(5, b, s, hq, hkv, d, dtype)[2]
    lengths = jnp.asarray(lengths, jnp.int32)
    out, lse = decode_attention(q, k, v, lengths, impl=impl)
    ref_out, ref_lse, ref_probs = np_decode(q, k, v, lengths)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, hq)
    _close(out, ref_out, dtype)
    _close_lse(lse, ref_lse, dtype)
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out)[empty] == 0)
    assert not np.isnan(np.asarray(out, np.float32)).any()

    out_p, lse_p, probs = decode_attention(q, k, v, lengths, impl=impl, return_probs=True)
    assert probs.shape == (b, hq, s) and probs.dtype == jnp.float32
    _close(out_p, ref_out, dtype)
    _close(probs, ref_probs, dtype)
    past = np.arange(s)[None, None, :] >= np.asarray(lengths)[:, None, None]
    assert np.all(np.where(past, np.asarray(probs), 0) == 0)  # exact zeros past the length
    same = lazy_decode_pv(probs, v, lengths=lengths, impl=impl)
    assert same.dtype == dtype and same.shape == q.shape
    _close(same, ref_out, dtype)
    g = hq // hkv
    gla_ref = np.einsum("bhs,bhsd->bhd", ref_probs, np.repeat(np.asarray(v2, np.float64), g, axis=1))
    _close(lazy_decode_pv(probs, v2, lengths=lengths, impl=impl), gla_ref, dtype)
    # Without lengths every key is used; probs are 0 there, same result.
    _close(lazy_decode_pv(probs, v2, impl=impl), gla_ref, dtype)


def test_gpu_decode_one_split_many_blocks():
    """GPU decode with a single key split, so one program's loop runs over
    all key blocks (the online-softmax rescale matters; with the default
    ~512 programs small test shapes get one block per split)."""
    b, s, hq, hkv, d = 2, 384, 4, 2, 80
    q, k, v = _decode_inputs(12, b, s, hq, hkv, d, jnp.float32, ramp=6.0)
    lengths = jnp.asarray([384, 200], jnp.int32)
    out, lse, probs = jax.jit(lambda *a: gpu.decode(*a, return_probs=True, interpret=True, programs=1))(q, k, v, lengths)
    ref_out, ref_lse, ref_probs = np_decode(q, k, v, lengths)
    _close(out, ref_out, jnp.float32)
    _close_lse(lse, ref_lse, jnp.float32)
    _close(probs, ref_probs, jnp.float32)
    lazy = jax.jit(lambda *a: gpu.lazy_pv(*a, interpret=True, programs=1))(probs, v, lengths)
    _close(lazy, ref_out, jnp.float32)


# ------------------------------------------------------------- xla decode HLO

def _large_copies(hlo_text, min_elements):
    return large_moves(hlo_text, min_elements, opcodes=("copy", "transpose", "convert"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_xla_decode_reads_cache_in_place(group, dtype):
    """The optimized HLO of the xla decode (with and without probabilities)
    and lazy P @ V holds no copy/transpose/convert as large as the cache."""
    b, hkv, s, d = 4, 16, 2880, 64
    f = jax.ShapeDtypeStruct
    cache = f((b, hkv, s, d), dtype)
    q, n = f((b, hkv * group, d), dtype), f((b,), jnp.int32)
    probs = f((b, hkv * group, s), jnp.float32)
    calls = [
        (lambda q, k, v, n: decode_attention(q, k, v, n, impl="xla"), (q, cache, cache, n)),
        (lambda q, k, v, n: decode_attention(q, k, v, n, impl="xla", return_probs=True), (q, cache, cache, n)),
        (lambda p, v, n: lazy_decode_pv(p, v, lengths=n, impl="xla"), (probs, cache, n)),
    ]
    for fn, args in calls:
        hlo = jax.jit(fn).lower(*args).compile().as_text()
        assert "dot(" in hlo or "fusion(" in hlo
        assert _large_copies(hlo, b * hkv * s * d) == []


def test_large_copy_detector_sees_copies():
    """The HLO check above is not vacuous: it flags a cache-sized transpose
    and a whole-cache convert."""
    cache = jax.ShapeDtypeStruct((2, 4, 256, 64), jnp.bfloat16)
    hlo = jax.jit(lambda k: jnp.swapaxes(k, 1, 2) * 2).lower(cache).compile().as_text()
    assert _large_copies(hlo, 2 * 4 * 256 * 64)
    hlo = jax.jit(lambda k: jnp.exp(k.astype(jnp.float32))).lower(cache).compile().as_text()
    assert _large_copies(hlo, 2 * 4 * 256 * 64)


# ------------------------------------------------------------- TPU VMEM budget

LLAVA_HEADS = [(32, 32), (40, 40)]  # LLaVA-1.5/NeXT 7B and 13B (MHA), head_dim 128


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_blocks_fit_default_vmem(dtype):
    """The chosen TPU block sizes keep the double-buffered tiles, scratch and
    score values of one grid step under the budget (< 16 MiB default scoped
    VMEM) for LLaVA shapes, so no vmem_limit_bytes is needed there."""
    d = 128
    for tq in (576, 577, 1000, 2048, 2880, 4096):
        for tk in (576, 1000, 2880, 4096):
            bq, bk = tpu.prefill_blocks(tq, tk, d, dtype)
            assert bk % 128 == 0 and bq <= 512 and bq % 8 == 0
            assert -tq % bq < bq // 4 + 16  # little query padding
            assert tpu.prefill_vmem_bytes(bq, bk, d, dtype) <= tpu.VMEM_BUDGET < tpu.DEFAULT_SCOPED_VMEM
    for hq, hkv in LLAVA_HEADS:
        for s in (576, 1024, 2880, 4096, 8192):
            for lazy in (False, True):
                hb, bk = tpu.decode_blocks(hkv, hq // hkv, s, d, dtype, lazy=lazy)
                assert hkv % hb == 0 and s % bk == 0
                used = tpu.decode_vmem_bytes(hb, hq // hkv, bk, d, dtype, lazy=lazy)
                assert used <= tpu.VMEM_BUDGET, (hq, s, lazy, hb, bk, used)
                # Big enough DMAs: a K tile of at least 256 KiB per grid step.
                assert hb * bk * d * jnp.dtype(dtype).itemsize >= 256 * 1024


def test_tpu_vmem_model():
    # (8, 128)-tiled f32, (16, 128)-tiled bf16; (rows, 1) pads to 128 lanes.
    assert tpu.tile_bytes((512, 128), jnp.float32) == 512 * 128 * 4
    assert tpu.tile_bytes((512, 1), jnp.float32) == 512 * 128 * 4
    assert tpu.tile_bytes((4, 1, 80), jnp.bfloat16) == 4 * 16 * 128 * 2
    # A configuration that does not fit gets an explicit, larger limit.
    assert tpu._vmem_limit(tpu.VMEM_BUDGET) is None
    assert tpu._vmem_limit(20 << 20) >= 20 << 20


# ------------------------------------------------------------- lowering

LOWER_ARGS = dict(b=2, tq=100, tk=256, hq=8, hkv=2, s=1024)


def _lowering_calls(impl, d, dtype):
    c = LOWER_ARGS
    f = jax.ShapeDtypeStruct
    i32 = jnp.int32
    prefill_args = (
        f((c["b"], c["hq"], c["tq"], d), dtype),
        f((c["b"], c["hkv"], c["tk"], d), dtype),
        f((c["b"], c["hkv"], c["tk"], d), dtype),
        f((c["b"], c["tq"]), i32),
        f((c["b"], c["tk"]), i32),
        f((c["b"], c["tk"]), jnp.bool_),
    )
    cache = f((c["b"], c["hkv"], c["s"], d), dtype)
    lengths = f((c["b"],), i32)
    return [
        (lambda *a: flash_attention(*a, impl=impl), prefill_args),
        (
            lambda q, k, v, n: decode_attention(q, k, v, n, impl=impl, return_probs=True),
            (f((c["b"], c["hq"], d), dtype), cache, cache, lengths),
        ),
        (
            lambda p, v, n: lazy_decode_pv(p, v, lengths=n, impl=impl),
            (f((c["b"], c["hq"], c["s"]), jnp.float32), cache, lengths),
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
def test_on_device_matches_numpy(d, dtype):
    args = _prefill_inputs(7, 2, 300, 700, 8, 2, d, dtype, ramp=8.0)
    out, lse = flash_attention(*args, impl=_DEVICE_IMPL)
    _check_prefill(out, lse, args, dtype)
    q, k, v = _decode_inputs(8, 2, 2048, 8, 2, d, dtype, ramp=6.0)
    lengths = jnp.asarray([2048, 999], jnp.int32)
    out, lse, probs = decode_attention(q, k, v, lengths, impl=_DEVICE_IMPL, return_probs=True)
    ref_out, ref_lse, ref_probs = np_decode(q, k, v, lengths)
    _close(out, ref_out, dtype)
    _close_lse(lse, ref_lse, dtype)
    _close(probs, ref_probs, dtype)
    lazy = lazy_decode_pv(probs, v, lengths=lengths, impl=_DEVICE_IMPL)
    _close(lazy, ref_out, dtype)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_train_attention_gradients_match_autodiff(hq, hkv):
    """xla_train's hand-written backward, through out and lse (a VLA lazy layer merges two key
    sets by lse in training), equals autodiff of the reference formula."""
    b, t, d = 2, 12, 8
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q, k, v = (jax.random.normal(ks[0], (b, hq, t, d)), jax.random.normal(ks[1], (b, hkv, t, d)),
               jax.random.normal(ks[2], (b, hkv, t, d)))
    w, u = jax.random.normal(ks[3], (b, hq, t, d)), jax.random.normal(ks[4], (b, hq, t))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.arange(t)[None] % 3 != 0  # some rows see no key (lse -inf): no NaN may appear

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v, pos, pos, valid)
            return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * u)
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    got = loss(lambda *a: flash_attention(*a, impl="xla_train"))
    want = loss(lambda *a: reference_attention(*a))
    for g_, w_ in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g_)))
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w_), atol=1e-4, rtol=1e-4)
