"""Causal, position-masked attention: the model's single entry point to the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(q, k, v, q_pos, kv_pos, kv_valid, *, impl: str = "auto"):
    """softmax(q k^T / sqrt(D)) v with key j visible to query i iff valid and kv_pos <= q_pos."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    qf = q.astype(jnp.float32).reshape(b, t, k.shape[2], g, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    mask = kv_valid[:, None, :] & (kv_pos[:, None, :] <= q_pos[:, :, None])
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return o.reshape(b, t, hq, d).astype(q.dtype)
