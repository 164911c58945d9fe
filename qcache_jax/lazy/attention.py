"""Lazy Attention with Q Cache (docs/method.md): a lazy layer inherits its anchor's attention.

GLA: the lazy layer attends with the anchor's post-RoPE queries (the Q Cache) and keys for
every token and computes only its own values. VLA: every query row scores the visual keys as
the anchor does (the anchor's query from the Q Cache against the anchor's visual keys) and the
text keys with the layer's own query and keys; one softmax over both, the layer's own values.
It runs as two attention calls - (Q_b, K_b) over the visual keys and (Q_l, K_l) over the text
keys - merged exactly by log-sum-exp. In decode the visual half is the anchor's visual-segment
probabilities, handed on in the carry, times the layer's own visual V.

:class:`LazyAttention` is one layer's attention in one pass, called by the layer stack
(:func:`qcache_jax.lazy.stack.run_layers`): it takes the layer, its normalised input, the
carried :class:`QCache`, the layer's lazy flag and (prefill, decode) its cache segments, and
returns the attention output, the next carry and the layer's new cache segments. The flag is
a Python bool when the schedule is fixed at trace time (unrolled loop) or a traced scalar
(scanned loop: ``lax.cond``, so only one branch runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..kernels import merge_attention, reference_attention
from ..nn.attention import attend, decode_segments, lazy_pv_segments, write_rows
from .cache import LayerCache
from .schedule import DEFAULT_MODE, check_mode


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QCache:
    """What an anchor hands the lazy layers of its block, carried layer to layer.

    ``q``: the Q Cache, the anchor's post-RoPE queries of this pass ([B, Hq, T, D] for a
    sequence; [B, Hq, D] for one decode step). ``k``: the keys a lazy layer inherits: the
    anchor's keys of the sequence ``(K [B, Hkv, T, D],)``, or in decode the anchor's cache key
    segments ``(visual, text)`` read in place. ``probs`` (decode, ``reuse_probs``): per cache
    segment the anchor's probabilities normalised within it ([B, Hq, S_i]) and its log-sum-exp
    ([B, Hq]); a GLA lazy layer multiplies all of them with its own V, a VLA lazy layer the
    visual one.
    """

    q: jax.Array
    k: tuple
    probs: tuple | None = None


@dataclasses.dataclass(frozen=True)
class SequencePass:
    """A whole sequence at once (full forward, prefill, calibration probe).

    ``cos``/``sin`` [B, T, D]; ``positions``, ``valid`` (key padding) and ``vis`` (image
    positions) [B, T]; ``segments`` [B, T] (optional): several sequences packed in a row after
    a shared prefix (segment 0), each seeing only the prefix and itself. ``probe_rows`` [R] (or
    [B, R], per row): also return every layer's attention probabilities of those query rows
    (calibration; FastV's ranking). ``fastv_row`` [B]: each row's selector token, whose
    attention ranks the visual tokens when the stack prunes them (FastV; the last prompt token). Prefill also gives ``img_idx`` [B, S_img] / ``txt_idx``
    [B, T_txt]: the prompt positions of each row's image / text tokens, in order, and
    ``text_len``, the text segment's capacity: each layer then returns its new cache segments.
    """

    cos: jax.Array
    sin: jax.Array
    positions: jax.Array
    valid: jax.Array
    vis: jax.Array
    segments: jax.Array | None = None
    probe_rows: jax.Array | None = None
    fastv_row: jax.Array | None = None
    img_idx: jax.Array | None = None
    txt_idx: jax.Array | None = None
    text_len: int = 0

    @property
    def is_prefill(self) -> bool:
        return self.img_idx is not None


@dataclasses.dataclass(frozen=True)
class DecodePass:
    """One new (text) token per row: angles [B, 1, D] and the valid entries per segment [B]."""

    cos: jax.Array
    sin: jax.Array
    n_img: jax.Array
    n_txt: jax.Array


def _gather(x, idx):
    """x [B, H, T, D] at per-row token indices idx [B, S] -> [B, H, S, D]."""
    return jnp.take_along_axis(x, idx[:, None, :, None], axis=2)


def _write(cache, slot, value):
    """cache[b, :, slot[b]] = value[b, :, 0] for every row of ``value`` (the cache's first
    rows: a decode step may compute only the live ones), in place.

    One ``dynamic_update_slice`` per row (the batch is static and small): XLA updates the
    donated buffer in place. A scatter would be lowered with an in-bounds guard, a ``select``
    between the old and the updated segment, for which XLA copies the whole segment every
    step. ``dynamic_update_slice`` clamps the index, so a full row (slot past the end) writes
    its last slot: such a row has finished (the engine stops a row when its cache is full) and
    the value is never read.
    """
    value = value.astype(cache.dtype)
    zero = jnp.zeros((), jnp.int32)
    for b in range(value.shape[0]):  # the live rows (decode_step's ``rows``): the first ones
        at = (jnp.int32(b), zero, slot[b].astype(jnp.int32), zero)
        cache = jax.lax.dynamic_update_slice(cache, value[b : b + 1], at)
    return cache


def fill_rows(x, n: int):
    """``x`` [B_live, ...] padded with zero rows to the cache's ``n`` rows: the idle rows beyond
    the live ones (prefill's caches and logits, decode_step's ``rows``)."""
    return x if x.shape[0] == n else jnp.pad(x, ((0, n - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _rows_of(x, rows):
    """The query rows ``rows`` of ``x`` (queries [B, H, T, D] or per-token [B, T]): one set for
    every row ([R]) or a set per row ([B, R])."""
    if rows.ndim == 1:
        return x[:, :, rows] if x.ndim == 4 else x[:, rows]
    return jnp.take_along_axis(x, rows[:, None, :, None], axis=2) if x.ndim == 4 else jnp.take_along_axis(x, rows, 1)


def _select(is_lazy, lazy_fn, anchor_fn, operand):
    """A static flag picks a branch in Python; a traced one runs ``lax.cond`` (one branch)."""
    if isinstance(is_lazy, (bool, np.bool_)):
        return (lazy_fn if is_lazy else anchor_fn)(operand)
    return jax.lax.cond(is_lazy, lazy_fn, anchor_fn, operand)


def _attend_parts(parts, v, ctx: SequencePass, impl, mesh):
    """Attention whose keys are split into disjoint parts ``(q, k, kv_valid)`` that score with
    their own queries and keys, one softmax over all of them, values ``v``: one part is plain
    attention; several are merged exactly by log-sum-exp. Also the probe rows' probabilities
    (calibration) of the same softmax, or None."""
    seg = ctx.segments
    res = [attend(q, k, v, ctx.positions, ctx.positions, valid, segments=seg, impl=impl, mesh=mesh,
                  return_lse=True) for q, k, valid in parts]
    out = res[0][0] if len(res) == 1 else merge_attention([o for o, _ in res], [lse for _, lse in res])[0]
    if ctx.probe_rows is None:
        return out, None
    rows = ctx.probe_rows
    probes = [reference_attention(_rows_of(q, rows), k, v, _rows_of(ctx.positions, rows), ctx.positions, valid,
                                  q_seg=None if seg is None else _rows_of(seg, rows), kv_seg=seg, return_probs=True)
              for q, k, valid in parts]
    if len(probes) == 1:
        return out, probes[0][2]
    # each part's probabilities are normalised within it: rescale by its share of the total mass
    _, total = merge_attention([p[0] for p in probes], [p[1] for p in probes])
    share = [jnp.where(jnp.isfinite(p[1]), jnp.exp(p[1] - total), 0.0)[..., None] for p in probes]
    return out, sum(p[2] * w for p, w in zip(probes, share))


@dataclasses.dataclass(frozen=True)
class LazyAttention:
    """Attention of one decoder layer under the lazy schedule, in ``mode`` ``vla`` or ``gla``.

    ``reuse_probs`` (decode): lazy layers multiply the anchor's attention probabilities (GLA:
    over every segment; VLA: over the visual segment) with their own V instead of recomputing
    softmax(Q_b K_b^T) (the same numbers).
    ``mesh``: a ``jax.sharding.Mesh`` with axes ``data`` and ``model``: the kernels and the
    cache writes then run per shard (:mod:`qcache_jax.nn.attention`); None: one device.
    """

    mode: str = DEFAULT_MODE
    impl: str = "auto"
    reuse_probs: bool = True
    mesh: Any = None

    def __post_init__(self):
        check_mode(self.mode)

    @property
    def passes_probs(self) -> bool:
        return self.reuse_probs

    def __call__(self, layer, x, qc, is_lazy, ctx, cache=None, *, stores=(True, True), hands_probs=False):
        """(attention output [B, Hq, T, D], next QCache, new LayerCache or None, probe or None).

        ``cache``: the layer's segments in decode (a missing key array is None and stays None).
        ``stores`` (prefill): which key segments this layer creates (:meth:`Schedule.stores_k`;
        a scanned loop creates both and the stack drops the unstored ones afterwards). ``hands_probs``: an
        anchor with a lazy block after it returns its decode probabilities in the carry.
        """
        if isinstance(ctx, DecodePass):
            out, qc, new = self._decode(layer, x, qc, is_lazy, ctx, cache, hands_probs)
            return out[: x.shape[0], :, None], qc, new, None
        return self._sequence(layer, x, qc, is_lazy, ctx, cache, stores)

    # -- a whole sequence ------------------------------------------------------------------------

    def _sequence(self, layer, x, qc, is_lazy, ctx: SequencePass, cache, stores):
        v = layer.values(x)

        def run(parts):
            return _attend_parts(parts, v, ctx, self.impl, self.mesh)

        def anchor(qc):
            q, k = layer.queries(x, ctx.cos, ctx.sin), layer.keys(x, ctx.cos, ctx.sin)
            return (*run([(q, k, ctx.valid)]), k, QCache(q, (k,)))

        def lazy(qc):
            if self.mode == "gla":  # no q/k projection at all
                return (*run([(qc.q, qc.k[0], ctx.valid)]), qc.k[0], qc)
            # VLA: visual keys scored as the anchor scores them (Q Cache, anchor keys), text keys
            # with the layer's own query and keys. The keys kept for the cache: its own at text
            # positions (the only ones a VLA lazy layer stores).
            q, k = layer.queries(x, ctx.cos, ctx.sin), layer.keys(x, ctx.cos, ctx.sin)
            out, probe = run([(qc.q, qc.k[0], ctx.valid & ctx.vis), (q, k, ctx.valid & ~ctx.vis)])
            return out, probe, jnp.where(ctx.vis[:, None, :, None], qc.k[0], k), qc

        out, probe, k, qc = _select(is_lazy, lazy, anchor, qc)
        new = None
        if ctx.is_prefill:
            def text(full):
                b, h, _, d = full.shape
                seg = jnp.zeros((b, h, ctx.text_len, d), full.dtype)
                return seg.at[:, :, : ctx.txt_idx.shape[1]].set(_gather(full, ctx.txt_idx))

            new = LayerCache(
                k_img=_gather(k, ctx.img_idx) if stores[0] else None,
                k_txt=text(k) if stores[1] else None,
                v_img=_gather(v, ctx.img_idx),
                v_txt=text(v),
            )
        return out, qc, new, probe

    # -- one decode step ---------------------------------------------------------------------------

    def _write(self, cache, slot, value):
        return write_rows(cache, slot, value, _write, mesh=self.mesh)

    def _decode(self, layer, x, qc, is_lazy, ctx: DecodePass, c: LayerCache, hands_probs):
        v_txt = self._write(c.v_txt, ctx.n_txt, layer.values(x))
        n_new = ctx.n_txt + 1
        has_img = c.v_img.shape[2] > 0
        img_values = [(c.v_img, ctx.n_img)] if has_img else []

        def segs(k_img, k_txt):
            return ([(k_img, c.v_img, ctx.n_img)] if has_img else []) + [(k_txt, v_txt, n_new)]

        def decode(q, segments, *, probs=False):
            return decode_segments(q, segments, impl=self.impl, return_probs=probs, mesh=self.mesh)

        rows = c.v_txt.shape[0]  # the cache's rows; x may hold only the live ones

        def anchor(qc):
            q = fill_rows(layer.queries(x, ctx.cos, ctx.sin)[:, :, 0], rows)
            k_txt = self._write(c.k_txt, ctx.n_txt, layer.keys(x, ctx.cos, ctx.sin))
            out, _, probs = decode(q, segs(c.k_img, k_txt), probs=hands_probs)
            new_qc = QCache(q, (c.k_img, k_txt) if has_img else (k_txt,), probs)
            return out, new_qc, LayerCache(c.k_img, k_txt, c.v_img, v_txt)

        def anchor_keys(qc):
            return (qc.k[0], qc.k[1]) if has_img else (None, qc.k[0])

        def pv(probs, values):
            return lazy_pv_segments(probs, values, impl=self.impl, mesh=self.mesh)

        def lazy(qc):
            k_img, k_txt = anchor_keys(qc)
            if self.mode == "gla":
                if self.passes_probs:
                    out, _ = pv(qc.probs, img_values + [(v_txt, n_new)])
                else:
                    out, _, _ = decode(qc.q, segs(k_img, k_txt))
                # Keys pass through untouched (None: the layer stores none).
                return out, qc, LayerCache(c.k_img, c.k_txt, c.v_img, v_txt)
            # VLA: the new token's text half with its own query and text keys, its visual half
            # as the anchor scored it (its probabilities, or its query and visual keys) with the
            # layer's own visual V; merged by log-sum-exp.
            q = fill_rows(layer.queries(x, ctx.cos, ctx.sin)[:, :, 0], rows)
            own = self._write(c.k_txt, ctx.n_txt, layer.keys(x, ctx.cos, ctx.sin))
            out, lse, _ = decode(q, [(own, v_txt, n_new)])
            if has_img:
                if self.passes_probs:
                    out_img, lse_img = pv(qc.probs[:1], img_values)
                else:
                    out_img, lse_img, _ = decode(qc.q, [(k_img, c.v_img, ctx.n_img)])
                out, _ = merge_attention([out_img, out], [lse_img, lse])
            return out, qc, LayerCache(c.k_img, own, c.v_img, v_txt)

        return _select(is_lazy, lazy, anchor, qc)
