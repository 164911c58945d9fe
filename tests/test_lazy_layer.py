"""One lazy layer's attention (``LazyAttention``, a whole sequence) against a plain float64 numpy
formula of docs/method.md, on every kernel: random queries, keys and values, GQA and MQA,
left padding, several visual spans per row, packed rows (the XLA kernels).

VLA: query row i scores visual key j with the anchor's ``Q_b[i]·K_b[j]`` and text key j with
its own ``Q_l[i]·K_l[j]``, one softmax over both, the layer's own V. GLA: ``Q_b K_b^T`` for
every key.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qcache_jax.lazy.attention import LazyAttention, QCache, SequencePass

IMPLS = ("xla", "xla_train", "pallas_gpu_interpret", "pallas_tpu_interpret")


@dataclasses.dataclass
class FixedLayer:
    """A stand-in decoder layer whose projections return given arrays (head-major)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray

    def queries(self, x, cos, sin):
        return jnp.asarray(self.q)

    def keys(self, x, cos, sin):
        return jnp.asarray(self.k)

    def values(self, x):
        return jnp.asarray(self.v)


def np_lazy(mode, q_b, k_b, q_l, k_l, v, pos, valid, vis, seg=None):
    """float64 (out [B, Hq, T, D], probs [B, Hq, T, T]) of a lazy layer."""
    b, hq, t, d = q_b.shape
    g = hq // k_b.shape[1]
    rep = lambda x: np.repeat(np.asarray(x, np.float64), g, axis=1)  # noqa: E731
    scores = lambda q, k: np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), rep(k)) / np.sqrt(d)  # noqa: E731
    s = scores(q_b, k_b) if mode == "gla" else np.where(vis[:, None, None, :], scores(q_b, k_b), scores(q_l, k_l))
    mask = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
    if seg is not None:
        mask &= (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    p /= np.where(p.sum(-1, keepdims=True) > 0, p.sum(-1, keepdims=True), 1)
    return np.einsum("bhqk,bhkd->bhqd", p, rep(v)), p


def _inputs(rng, b, t, hq, hkv, d, *, packed=False):
    arr = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q_b, q_l, k_b, k_l, v = arr(b, hq, t, d), arr(b, hq, t, d), arr(b, hkv, t, d), arr(b, hkv, t, d), arr(b, hkv, t, d)
    pad = np.array([0, 3][:b])  # left padding of row 1
    pos = np.maximum(np.arange(t)[None] - pad[:, None], 0).astype(np.int32)
    valid = np.arange(t)[None] >= pad[:, None]
    vis = np.zeros((b, t), bool)
    vis[0, 2:7] = True  # one image after a text prefix
    if b > 1:
        vis[1, 4:6] = vis[1, 9:12] = True  # two images in the other row
    seg = None
    if packed:  # a shared prefix (segment 0, the image inside it) and two questions after it
        seg = np.zeros((b, t), np.int32)
        seg[:, t - 6: t - 3], seg[:, t - 3:] = 1, 2
    return q_b, q_l, k_b, k_l, v, pos, valid, vis, seg


@pytest.mark.parametrize("mode", ["vla", "gla"])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (4, 2, 8), (6, 1, 32)])
@pytest.mark.parametrize("impl", IMPLS)
def test_lazy_layer_matches_numpy(impl, hq, hkv, d, mode, rng):
    b, t = 2, 16
    q_b, q_l, k_b, k_l, v, pos, valid, vis, _ = _inputs(rng, b, t, hq, hkv, d)
    ctx = SequencePass(cos=None, sin=None, positions=jnp.asarray(pos), valid=jnp.asarray(valid),
                       vis=jnp.asarray(vis), probe_rows=jnp.asarray([t - 1, 5]))
    attn = LazyAttention(mode=mode, impl=impl)
    qc = QCache(jnp.asarray(q_b), (jnp.asarray(k_b),))
    out, _, _, probe = attn(FixedLayer(q_l, k_l, v), None, qc, True, ctx)
    ref, probs = np_lazy(mode, q_b, k_b, q_l, k_l, v, pos, valid, vis)
    ok = valid[:, None, :, None]  # padded query rows see nothing but themselves: compare real rows
    np.testing.assert_allclose(np.where(ok, np.asarray(out, np.float64), 0), np.where(ok, ref, 0), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(probe), probs[:, :, [t - 1, 5]], atol=2e-6, rtol=1e-4)
    if mode == "vla":  # the superseded reading (own query on the anchor's visual keys) differs
        sel = vis[:, None, :, None]
        old, _ = np_lazy("gla", np.where(sel, q_b, q_l), np.where(sel, k_b, k_l), None, None, v, pos, valid, vis)
        assert np.abs(np.where(ok, old - ref, 0)).max() > 1e-2


@pytest.mark.parametrize("impl", ["xla", "xla_train"])
def test_lazy_layer_packed_rows_match_numpy(impl, rng):
    """Packed rows (training's layout): each question sees the shared prefix and itself."""
    b, t, hq, hkv, d = 2, 16, 4, 2, 8
    q_b, q_l, k_b, k_l, v, pos, valid, vis, seg = _inputs(rng, b, t, hq, hkv, d, packed=True)
    ctx = SequencePass(cos=None, sin=None, positions=jnp.asarray(pos), valid=jnp.asarray(valid),
                       vis=jnp.asarray(vis), segments=jnp.asarray(seg))
    out, *_ = LazyAttention(mode="vla", impl=impl)(FixedLayer(q_l, k_l, v), None,
                                                   QCache(jnp.asarray(q_b), (jnp.asarray(k_b),)), True, ctx)
    ref, _ = np_lazy("vla", q_b, k_b, q_l, k_l, v, pos, valid, vis, seg)
    ok = valid[:, None, :, None]
    np.testing.assert_allclose(np.where(ok, np.asarray(out, np.float64), 0), np.where(ok, ref, 0), atol=2e-5, rtol=1e-4)
