"""The model's entry points to the attention kernels (dispatch by backend lives in kernels/).

Layout everywhere: head-major, queries [B, Hq, T, D], keys and values [B, Hkv, T, D] (a KV
cache segment is [B, Hkv, S, D]), so that attention over a cache reads it in its own layout:
no per-step transpose of the cache.

With a device ``mesh`` (axes ``data`` and ``model``, docs/architecture.md "Scaling out") every
call runs per shard under ``jax.shard_map``: rows on ``data``, query heads on ``model``, KV heads
on ``model`` when the axis divides them (else every shard holds all KV heads and picks the ones
its query heads read). A kernel, Pallas or XLA, sees only its local rows and heads; the
segment merge and a GLA anchor's probabilities are per shard too (no collective). Without a
mesh nothing here differs from a plain call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..kernels import decode_attention, flash_attention, lazy_decode_pv, merge_attention

DATA, MODEL = "data", "model"  # the mesh axes: batch rows, tensor parallel (heads, MLP, vocabulary)


def axis_size(mesh, axis: str) -> int:
    """How many devices ``mesh`` has along ``axis`` (1 when it has no such axis)."""
    return int(dict(mesh.shape).get(axis, 1))


def sharded_over(n: int, mesh, axis: str = MODEL) -> bool:
    """Whether ``n`` (heads, rows, a hidden size) is split over ``axis``: the axis is larger
    than 1 and divides it. Otherwise the dimension is replicated (the one rule, shared with
    :mod:`qcache_jax.runtime.mesh`)."""
    m = axis_size(mesh, axis)
    return m > 1 and n % m == 0


def _rows(mesh, b: int):
    return DATA if sharded_over(b, mesh, DATA) else None


def _heads(mesh, n: int):
    return MODEL if sharded_over(n, mesh) else None


def _local_kv(x, n_q: int, q_axis, kv_axis):
    """The KV heads the local query heads read, from a shard holding ``x`` [B, Hkv_local, S, D].

    KV heads split like the query heads (or nothing split): ``x`` as is. Query heads split but
    KV heads replicated (fewer KV heads than the axis): query head h reads KV head h // g, so
    a shard picks its heads' one KV head (one group spans shards) or, in general, one KV head
    per local query head.
    """
    if q_axis is None or kv_axis is not None:
        return x
    hq_l, hkv = n_q, x.shape[1]
    g = hq_l * jax.lax.axis_size(MODEL) // hkv
    first = jax.lax.axis_index(MODEL) * hq_l
    if g % hq_l == 0:
        return jax.lax.dynamic_slice_in_dim(x, first // g, 1, axis=1)
    return jnp.take(x, (first + jnp.arange(hq_l)) // g, axis=1)


def _per_shard(mesh, fn, args, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def bidirectional_positions(valid):
    """Mask positions under which every valid key is visible to every query (all equal): the
    kernels' causal test ``kv_pos <= q_pos`` then holds everywhere."""
    return jnp.zeros(valid.shape, jnp.int32)


def attend(q, k, v, q_pos, kv_pos, kv_valid, *, segments=None, causal: bool = True, impl: str = "auto", mesh=None,
           return_lse=False):
    """softmax(q k^T / sqrt(D)) v [B, Hq, Tq, D]; key j visible to query i iff valid and
    kv_pos <= q_pos (and, with ``segments`` [B, T] for a packed self-attention, in the shared
    prefix segment 0 or in the query's own segment). ``causal=False`` (a vision tower's
    bidirectional attention): positions are ignored, every valid key (of the query's segment)
    is visible; ``q_pos`` / ``kv_pos`` may then be None. ``return_lse``: (out, lse [B, Hq, Tq]),
    for merging attention over disjoint key sets (a VLA lazy layer's visual and text keys)."""
    if not causal:
        q_pos = bidirectional_positions(q[:, 0, :, 0])
        kv_pos = bidirectional_positions(kv_valid)
    if mesh is None:
        res = flash_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg=segments, kv_seg=segments, impl=impl)
        return res if return_lse else res[0]
    r, qa, ka = _rows(mesh, q.shape[0]), _heads(mesh, q.shape[1]), None
    ka = _heads(mesh, k.shape[1]) if qa else None
    rows = P(r)

    def local(q, k, v, q_pos, kv_pos, kv_valid, *seg):
        k, v = _local_kv(k, q.shape[1], qa, ka), _local_kv(v, q.shape[1], qa, ka)
        s = seg[0] if seg else None
        res = flash_attention(q, k, v, q_pos, kv_pos, kv_valid, q_seg=s, kv_seg=s, impl=impl)
        return res if return_lse else res[0]

    args = (q, k, v, q_pos, kv_pos, kv_valid) + (() if segments is None else (segments,))
    specs = (P(r, qa), P(r, ka), P(r, ka), rows, rows, rows) + (() if segments is None else (rows,))
    return _per_shard(mesh, local, args, specs, (P(r, qa), P(r, qa)) if return_lse else P(r, qa))


def _decode_segments(q, segments, impl, return_probs):
    results = [decode_attention(q, k, v, n, impl=impl, return_probs=return_probs) for k, v, n in segments]
    if len(results) == 1:
        out, lse = results[0][0], results[0][1]
    else:
        out, lse = merge_attention([r[0] for r in results], [r[1] for r in results])
    return out, lse, (tuple((r[2], r[1]) for r in results) if return_probs else None)


def decode_segments(q, segments, *, impl: str = "auto", return_probs: bool = False, mesh=None):
    """One query per row [B, Hq, D] against several cache segments ``(k, v, lengths)``:
    (out [B, Hq, D], lse [B, Hq], probs or None).

    Segments (the visual and the text part of a row's cache) are attended separately and
    merged exactly by log-sum-exp, so no segment is ever concatenated (copied). With
    ``return_probs``, ``probs`` holds per segment ``(p, lse)``: its probabilities normalised
    within the segment ([B, Hq, S_i] float32) and its log-sum-exp ([B, Hq]). That is what an
    anchor hands its lazy layers (:func:`lazy_pv_segments`): GLA reuses every segment, VLA the
    visual one.
    """
    if mesh is None:
        return _decode_segments(q, segments, impl, return_probs)
    r, qa = _rows(mesh, q.shape[0]), _heads(mesh, q.shape[1])
    ka = _heads(mesh, segments[0][0].shape[1]) if qa else None

    def local(q, segs):
        segs = [(_local_kv(k, q.shape[1], qa, ka), _local_kv(v, q.shape[1], qa, ka), n) for k, v, n in segs]
        out, lse, probs = _decode_segments(q, segs, impl, return_probs)
        return (out, lse, probs) if return_probs else (out, lse)

    seg_specs = [(P(r, ka), P(r, ka), P(r)) for _ in segments]
    head = P(r, qa)
    out_specs = (head, head) + ((tuple((head, head) for _ in segments),) if return_probs else ())
    res = _per_shard(mesh, local, (q, [tuple(s) for s in segments]), (head, seg_specs), out_specs)
    return res if return_probs else (*res, None)


def _lazy_pv(probs, segments, impl):
    outs = [lazy_decode_pv(p, v, lengths=n, impl=impl) for (p, _), (v, n) in zip(probs, segments)]
    if len(outs) == 1:
        return outs[0], probs[0][1]
    return merge_attention(outs, [lse for _, lse in probs])


def lazy_pv_segments(probs, segments, *, impl: str = "auto", mesh=None):
    """Lazy-layer decode with the anchor's probabilities: (out [B, Hq, D], lse [B, Hq]).

    ``probs``: per segment ``(p, lse)`` as :func:`decode_segments` returns them; ``segments``:
    the lazy layer's own ``(v, lengths)`` of the same segments. Each segment's ``p @ V`` is
    merged by the anchor's log-sum-exp, which equals softmax(Q_b K_b^T) V over the segments.
    Reads only V, and only its valid entries (keys j < lengths[b]).
    """
    if mesh is None:
        return _lazy_pv(probs, segments, impl)
    r, qa = _rows(mesh, probs[0][0].shape[0]), _heads(mesh, probs[0][0].shape[1])
    ka = _heads(mesh, segments[0][0].shape[1]) if qa else None

    def local(probs, segs):
        n_q = probs[0][0].shape[1]
        return _lazy_pv(probs, [(_local_kv(v, n_q, qa, ka), n) for v, n in segs], impl)

    head = P(r, qa)
    specs = (tuple((head, head) for _ in probs), [(P(r, ka), P(r)) for _ in segments])
    return _per_shard(mesh, local, (tuple(tuple(x) for x in probs), [tuple(s) for s in segments]), specs,
                      (head, head))


def write_rows(cache, slot, value, write, *, mesh=None):
    """``write(cache, slot, value)`` (a per-row in-place cache write) run per shard with a mesh:
    each shard writes its own rows and KV heads, so the cache is never gathered."""
    if mesh is None:
        return write(cache, slot, value)
    r, ka = _rows(mesh, cache.shape[0]), _heads(mesh, cache.shape[1])
    return _per_shard(mesh, write, (cache, slot, value), (P(r, ka), P(r), P(r, ka)), P(r, ka))
