"""The model's entry points to the attention kernels (dispatch by backend lives in kernels/).

Layout everywhere: head-major, queries [B, Hq, T, D], keys and values [B, Hkv, T, D] (a KV
cache segment is [B, Hkv, S, D]), so that attention over a cache reads it in its own layout:
no per-step transpose of the cache.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..kernels import decode_attention, flash_attention, lazy_decode_pv, merge_attention


def attend(q, k, v, q_pos, kv_pos, kv_valid, *, segments=None, impl: str = "auto"):
    """softmax(q k^T / sqrt(D)) v [B, Hq, Tq, D]; key j visible to query i iff valid and
    kv_pos <= q_pos (and, with ``segments`` [B, T] for a packed self-attention, in the shared
    prefix segment 0 or in the query's own segment)."""
    return flash_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg=segments, kv_seg=segments, impl=impl)[0]


def decode_segments(q, segments, *, impl: str = "auto", return_probs: bool = False):
    """One query per row [B, Hq, D] against several cache segments ``(k, v, lengths)``.

    Segments (the visual and the text part of a row's cache) are attended separately and
    merged exactly by log-sum-exp, so no segment is ever concatenated (copied). With
    ``return_probs`` also returns each segment's probabilities normalised over *all* segments
    ([B, Hq, S_i] float32), which a GLA lazy layer multiplies with its own V.
    """
    results = [decode_attention(q, k, v, n, impl=impl, return_probs=return_probs) for k, v, n in segments]
    if len(results) == 1:
        out, lse = results[0][0], results[0][1]
    else:
        out, lse = merge_attention([r[0] for r in results], [r[1] for r in results])
    if not return_probs:
        return out, None
    # p_i is normalised within segment i; rescale by that segment's share of the total mass.
    probs = tuple(r[2] * jnp.where(jnp.isfinite(r[1]), jnp.exp(r[1] - lse), 0.0)[..., None] for r in results)
    return out, probs


def lazy_pv_segments(probs, segments, *, impl: str = "auto"):
    """GLA lazy-layer decode: the sum over segments ``(v, lengths)`` of ``probs_i @ V_i``.

    Reads only V, and only its valid entries (keys j < lengths[b]).
    """
    outs = [lazy_decode_pv(p, v, lengths=n, impl=impl).astype(jnp.float32) for p, (v, n) in zip(probs, segments)]
    return sum(outs[1:], outs[0]).astype(segments[0][0].dtype)
