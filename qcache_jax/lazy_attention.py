"""Lazy Attention with Q Cache (method.md): a lazy layer inherits its anchor's attention pattern.

GLA: the lazy layer uses the anchor's post-RoPE queries (the Q Cache) and keys for every token
and computes only its own values. VLA: the same, but only at image-token positions; text
positions use the layer's own queries and keys.

One :class:`LazyAttention` serves the three passes: the full-sequence forward (schedule as a
scanned, traced mask, ``lax.cond`` per layer), prefill and decode (schedule fixed at trace
time, unrolled layers, cache written per layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attend, decode_segments, lazy_pv_segments
from .cache import LayerCache
from .config import TextConfig
from .errors import QCacheError

MODES = ("vla", "gla")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QCache:
    """The current anchor's post-RoPE queries ``q`` [B, T, Hq, D] and keys ``k`` [B, T, Hkv, D].

    Lives in the layer loop's carry; an anchor layer overwrites it, its lazy block reads it.
    """

    q: jax.Array
    k: jax.Array

    @classmethod
    def empty(cls, batch: int, length: int, cfg: TextConfig, dtype) -> "QCache":
        return cls(
            q=jnp.zeros((batch, length, cfg.num_heads, cfg.head_dim), dtype),
            k=jnp.zeros((batch, length, cfg.num_kv_heads, cfg.head_dim), dtype),
        )


@dataclasses.dataclass
class DecodeCarry:
    """What an anchor hands its lazy block within one decode step (Python-level, unrolled)."""

    q: jax.Array  # the Q Cache for this step: anchor queries [B, Hq, D]
    anchor: int  # the anchor's layer index (its K cache is read in place)
    probs: list | None  # GLA: the anchor's probabilities per segment, reused by lazy layers


def _gather(x, idx):
    """x [B, T, H, D] at per-row token indices idx [B, S] -> [B, S, H, D]."""
    return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)


def _write(cache, rows, slot, value):
    """cache[b, slot[b]] = value[b]; an out-of-range slot (full cache) writes nothing."""
    return cache.at[rows, slot].set(value.astype(cache.dtype), mode="drop")


@dataclasses.dataclass(frozen=True)
class LazyAttention:
    """Attention of one decoder layer under the lazy schedule, in ``mode`` ``vla`` or ``gla``.

    ``reuse_probs`` (GLA decode only): lazy layers multiply the anchor's attention
    probabilities with their own V instead of recomputing softmax(Q_b K_b^T) (same numbers).
    """

    mode: str = "vla"
    impl: str = "auto"
    reuse_probs: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise QCacheError(f"unknown lazy mode {self.mode!r}; expected one of {', '.join(MODES)}")

    # -- queries and keys of a layer: own (anchor) or inherited (lazy) ------------------------

    def _anchor_qk(self, layer, x, cos, sin, vis, qc):
        q, k = layer.queries(x, cos, sin), layer.keys(x, cos, sin)
        return q, k, QCache(q, k)

    def _lazy_qk(self, layer, x, cos, sin, vis, qc):
        if self.mode == "gla":
            return qc.q, qc.k, qc  # no q/k projection at all
        sel = vis[:, :, None, None]
        q = jnp.where(sel, qc.q, layer.queries(x, cos, sin))
        k = jnp.where(sel, qc.k, layer.keys(x, cos, sin))
        return q, k, qc

    def qk(self, layer, x, cos, sin, vis, qc, is_lazy):
        """(queries, keys, new Q Cache) of a layer. ``is_lazy`` static -> Python branch;
        traced (a scanned schedule bit) -> ``lax.cond``, so only one branch runs."""
        if isinstance(is_lazy, (bool, np.bool_)):
            branch = self._lazy_qk if is_lazy else self._anchor_qk
            return branch(layer, x, cos, sin, vis, qc)
        return jax.lax.cond(
            is_lazy,
            lambda c: self._lazy_qk(layer, x, cos, sin, vis, c),
            lambda c: self._anchor_qk(layer, x, cos, sin, vis, c),
            qc,
        )

    # -- the three passes ----------------------------------------------------------------------

    def full_sequence(self, layer, x, cos, sin, positions, valid, vis, qc, is_lazy, *, dense: bool):
        """Attention output [B, T, Hq, D] for a whole sequence (no cache) and the new Q Cache."""
        if dense:
            q, k = layer.queries(x, cos, sin), layer.keys(x, cos, sin)
        else:
            q, k, qc = self.qk(layer, x, cos, sin, vis, qc, is_lazy)
        v = layer.values(x)
        return attend(q, k, v, positions, positions, valid, impl=self.impl), qc

    def prefill(
        self, layer, x, cos, sin, positions, valid, vis, qc, is_lazy: bool, cache: LayerCache, img_idx, txt_idx
    ):
        """Prompt attention plus this layer's cache segments, written from token 0 of each segment.

        ``img_idx`` [B, S_img] / ``txt_idx`` [B, T] are the prompt positions of each row's
        image / text tokens in order (entries past the row's count are don't-care).
        """
        q, k, qc = self.qk(layer, x, cos, sin, vis, qc, is_lazy)
        v = layer.values(x)
        out = attend(q, k, v, positions, positions, valid, impl=self.impl)
        t = txt_idx.shape[1]
        new = LayerCache(
            # A VLA lazy layer's k equals its own keys at text positions (anchor's at image ones).
            k_img=None if cache.k_img is None else _gather(k, img_idx).astype(cache.k_img.dtype),
            k_txt=None
            if cache.k_txt is None
            else cache.k_txt.at[:, :t].set(_gather(k, txt_idx).astype(cache.k_txt.dtype)),
            v_img=_gather(v, img_idx).astype(cache.v_img.dtype),
            v_txt=cache.v_txt.at[:, :t].set(_gather(v, txt_idx).astype(cache.v_txt.dtype)),
        )
        return out, qc, new

    def decode(
        self,
        layer,
        x,
        cos,
        sin,
        index: int,
        is_lazy: bool,
        caches: list,
        n_img,
        n_txt,
        carry: DecodeCarry | None,
        *,
        gla_block: bool,
    ):
        """One new (text) token per row through layer ``index``; updates ``caches[index]`` in
        place in the list and returns (attention output [B, Hq, D], carry for the next layer).

        ``gla_block``: this anchor has lazy layers after it in GLA mode (so it returns its
        probabilities for them when ``reuse_probs``).
        """
        c: LayerCache = caches[index]
        b = x.shape[0]
        rows = jnp.arange(b)
        v = layer.values(x)[:, 0]
        v_txt = _write(c.v_txt, rows, n_txt, v)
        n_new = n_txt + 1
        has_img = c.v_img.shape[1] > 0

        def segs(k_img, k_txt):
            s = [(k_img, c.v_img, n_img)] if has_img else []
            return s + [(k_txt, v_txt, n_new)]

        if not is_lazy:
            q = layer.queries(x, cos, sin)[:, 0]
            k_txt = _write(c.k_txt, rows, n_txt, layer.keys(x, cos, sin)[:, 0])
            caches[index] = LayerCache(c.k_img, k_txt, c.v_img, v_txt)
            want_probs = gla_block and self.reuse_probs
            out, probs = decode_segments(q, segs(c.k_img, k_txt), impl=self.impl, return_probs=want_probs)
            return out, DecodeCarry(q=q, anchor=index, probs=probs)

        anchor = caches[carry.anchor]
        if self.mode == "gla":
            caches[index] = LayerCache(None, None, c.v_img, v_txt)
            if self.reuse_probs:
                values = ([(c.v_img, n_img)] if has_img else []) + [(v_txt, n_new)]
                return lazy_pv_segments(carry.probs, values, impl=self.impl), carry
            out, _ = decode_segments(carry.q, segs(anchor.k_img, anchor.k_txt), impl=self.impl)
            return out, carry
        # VLA: the new token is text, so the layer uses its own query; visual keys are the anchor's.
        q = layer.queries(x, cos, sin)[:, 0]
        k_txt = _write(c.k_txt, rows, n_txt, layer.keys(x, cos, sin)[:, 0])
        caches[index] = LayerCache(None, k_txt, c.v_img, v_txt)
        out, _ = decode_segments(q, segs(anchor.k_img, k_txt), impl=self.impl)
        return out, carry
