"""The one layer stack: every pass (full-sequence logits, prefill, decode, calibration probe)
runs the decoder layers through :func:`run_layers`.

``loop="unroll"`` runs the layers in a Python loop with the schedule fixed at trace time: a
GLA lazy layer's query/key projections are simply absent from the program, each layer reads
its own weight and cache arrays in place, and its missing key arrays do not exist. This is the
generate path.

``loop="scan"`` scans one traced layer over the stacked layers with the schedule as a scanned
boolean mask (``lax.cond`` per layer, so a lazy layer still runs only its branch): one
compiled layer, quick to compile, what training and logits use. Caches, when a pass has them,
go through the scan as uniform per-layer segments (a layer that stores no key gets a zero
placeholder that is dropped again afterwards), so a scanned decode copies caches every step;
it exists so that both loops can be tested equal on every pass, not for speed.

The layer-loop carry is ``(h, QCache)``: the Q Cache travels from an anchor to its lazy
layers inside the loop and never outlives the pass.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from ..nn.layers import check_loop, layer_loop
from .attention import DecodePass, LazyAttention, QCache, SequencePass
from .cache import LayerCache
from .fastv import FastV
from .schedule import Schedule


@dataclasses.dataclass
class StackOutput:
    """``h``: the last layer's output; ``caches``: each layer's new cache segments (None
    without caches); ``probes``: each layer's probe rows [B, Hq, R, T] (None without probe);
    ``kept`` (a FastV sequence pass): the visual tokens kept above layer K [B, T]."""

    h: jax.Array
    caches: tuple | None
    probes: list | None
    kept: jax.Array | None = None


def _empty_qcache(ctx, h, cfg, caches, attn: LazyAttention) -> QCache:
    """A zero carry with the structure an anchor produces, for a traced schedule (both
    ``lax.cond`` branches, and the scan carry, need it before the first anchor has run)."""
    b, dt = h.shape[0], h.dtype
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if isinstance(ctx, SequencePass):
        t = h.shape[1]
        return QCache(jnp.zeros((b, hq, t, d), dt), (jnp.zeros((b, hkv, t, d), dt),))
    c = caches[0]
    b = c.v_txt.shape[0]  # the cache's rows (h may hold only the live ones)
    segments = ([c.v_img] if c.v_img.shape[2] > 0 else []) + [c.v_txt]
    probs = tuple((jnp.zeros((b, hq, s.shape[2]), jnp.float32), jnp.zeros((b, hq), jnp.float32)) for s in segments)
    probs = probs if attn.passes_probs else None
    return QCache(jnp.zeros((b, hq, d), dt), tuple(jnp.zeros_like(s) for s in segments), probs)


def _uniform(cache: LayerCache) -> LayerCache:
    """Every key array present (zeros where the layer stores none): scanned caches must be alike."""
    return LayerCache(
        k_img=cache.k_img if cache.k_img is not None else jnp.zeros_like(cache.v_img),
        k_txt=cache.k_txt if cache.k_txt is not None else jnp.zeros_like(cache.v_txt),
        v_img=cache.v_img,
        v_txt=cache.v_txt,
    )


def _keep_stored(cache: LayerCache, stores: tuple[bool, bool]) -> LayerCache:
    return dataclasses.replace(
        cache, k_img=cache.k_img if stores[0] else None, k_txt=cache.k_txt if stores[1] else None
    )


def run_layers(
    layers: Sequence,
    h,
    ctx: SequencePass | DecodePass,
    *,
    attn: LazyAttention,
    lazy,
    cfg,
    caches: Sequence[LayerCache] | None = None,
    loop: str = "unroll",
    fastv: FastV | None = None,
) -> StackOutput:
    """Run the decoder ``layers`` on hidden states ``h`` [B, T, hidden] in pass ``ctx``.

    ``lazy``: a :class:`Schedule` (its mode must be ``attn.mode``), or a traced boolean array
    [L] (only for passes without caches: the cache's structure needs a static schedule).
    ``caches``: the layers' cache segments in decode, laid out for the schedule; a prefill
    pass creates them (and returns them in either case).
    ``cfg``: the :class:`~qcache_jax.config.TextConfig`. Both ``loop`` values compute the same
    numbers. ``fastv``: prune visual tokens after layer K (:mod:`qcache_jax.lazy.fastv`): the
    layers run in two parts, 0..K and K+1.., the second on the kept visual tokens only (the
    schedule cut at K, so no Q Cache crosses from one part to the other).
    """
    if fastv is None:
        return _run_part(layers, h, ctx, attn=attn, lazy=lazy, cfg=cfg, caches=caches, loop=loop)
    k = fastv.layer + 1
    lazy = fastv.cut(lazy)
    below = dataclasses.replace(lazy, lazy=lazy.lazy[:k]) if isinstance(lazy, Schedule) else lazy[:k]
    above = dataclasses.replace(lazy, lazy=lazy.lazy[k:]) if isinstance(lazy, Schedule) else lazy[k:]
    split = (None, None) if caches is None else (caches[:k], caches[k:])
    if isinstance(ctx, DecodePass):
        first = _run_part(layers[:k], h, ctx, attn=attn, lazy=below, cfg=cfg, caches=split[0], loop=loop)
        # The layers above K hold the kept visual tokens only: kept(n) of each row's n.
        n_img = fastv.kept_counts(ctx.n_img, caches[0].v_img.shape[2])
        ctx_above = dataclasses.replace(ctx, n_img=n_img)
    else:
        if ctx.probe_rows is not None or ctx.segments is not None or ctx.fastv_row is None:
            raise ValueError("a FastV pass needs fastv_row (the selector token) and no probe rows or packing")
        first = _run_part(layers[:k], h, dataclasses.replace(ctx, probe_rows=ctx.fastv_row[:, None]), attn=attn,
                          lazy=below, cfg=cfg, caches=None, loop=loop)
        # layer K's probabilities of the selector row rank the visual tokens (probe rows change
        # neither h nor the caches a prefill makes)
        kept = fastv.select(first.probes[-1], ctx.vis)
        ctx_above = _pruned(ctx, kept, fastv)
    second = _run_part(layers[k:], first.h, ctx_above, attn=attn, lazy=above, cfg=cfg, caches=split[1], loop=loop)
    caches_out = None if first.caches is None else first.caches + second.caches
    return StackOutput(h=second.h, caches=caches_out, probes=None, kept=None if isinstance(ctx, DecodePass) else kept)


def _pruned(ctx: SequencePass, kept, fastv: FastV) -> SequencePass:
    """``ctx`` for the layers above K: the dropped visual tokens are no keys (masked; their
    positions, hence RoPE angles and the causal mask, are unchanged), and a prefill stores the
    kept ones only, in their order (``fastv.kept(S_img)`` entries per row)."""
    dropped = ctx.vis & ~kept
    ctx = dataclasses.replace(ctx, valid=ctx.valid & ~dropped, vis=kept, fastv_row=None)
    if ctx.is_prefill:
        cap = fastv.kept(ctx.img_idx.shape[1])
        idx = jnp.argsort(~kept, axis=1, stable=True)[:, :cap]
        # A prompt shorter than the capacity gives fewer columns: pad, as prefill pads img_idx,
        # so the stored arrays have the layout's shapes (decode reads only the kept entries).
        idx = jnp.pad(idx, ((0, 0), (0, cap - idx.shape[1])))
        ctx = dataclasses.replace(ctx, img_idx=idx)
    return ctx


def _run_part(layers, h, ctx, *, attn, lazy, cfg, caches=None, loop="unroll") -> StackOutput:
    """:func:`run_layers` without FastV: the layers share one token set."""
    check_loop(loop)
    n = len(layers)
    static = isinstance(lazy, Schedule)
    if static and not lazy.is_dense and lazy.mode != attn.mode:
        raise ValueError(f"schedule mode {lazy.mode!r} differs from the attention's {attn.mode!r}")
    makes_caches = caches is not None or (isinstance(ctx, SequencePass) and ctx.is_prefill)
    if makes_caches and not static:
        raise ValueError("a pass with caches needs a static Schedule (it fixes which key arrays exist)")
    stores = [lazy.stores_k(i) for i in range(n)] if static else [(True, True)] * n

    if loop == "unroll" and static:
        flags = list(lazy.lazy)
        hands = [lazy.hands_probs(i) and attn.reuse_probs for i in range(n)]
        qc0 = None  # layer 0 is an anchor: it fills the carry before any lazy layer reads it
    else:
        flags = jnp.asarray(lazy.mask if static else lazy, bool)
        flags = [flags[i] for i in range(n)] if loop == "unroll" else flags
        hands = [attn.passes_probs] * n
        qc0 = _empty_qcache(ctx, h, cfg, caches, attn)

    def body(layer, carry, x):
        h, qc = carry
        is_lazy, cache, stores_l, hands_l = x
        out, qc, new, probe = attn(
            layer, layer.attn_input(h), qc, is_lazy, ctx, cache, stores=stores_l, hands_probs=hands_l
        )
        return (layer.output(h, out), qc), (new, probe)

    if loop == "unroll":
        xs = [(flags[i], None if caches is None else caches[i], stores[i], hands[i]) for i in range(n)]
        (h, _), ys = layer_loop(layers, body, (h, qc0), xs, loop="unroll")
    else:
        uniform = None if caches is None else [_uniform(c) for c in caches]

        def scan_body(layer, carry, x):
            is_lazy, cache = x
            return body(layer, carry, (is_lazy, cache, (True, True), attn.passes_probs))

        xs = [(flags[i], None if uniform is None else uniform[i]) for i in range(n)]
        (h, _), ys = layer_loop(layers, scan_body, (h, qc0), xs, loop="scan")
    new_caches = tuple(_keep_stored(y[0], stores[i]) for i, y in enumerate(ys)) if makes_caches else None
    probes = [y[1] for y in ys] if ys and ys[0][1] is not None else None
    return StackOutput(h=h, caches=new_caches, probes=probes)
