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
from .schedule import Schedule


@dataclasses.dataclass
class StackOutput:
    """``h``: the last layer's output; ``caches``: each layer's new cache segments (None
    without caches); ``probes``: each layer's probe rows [B, Hq, R, T] (None without probe)."""

    h: jax.Array
    caches: tuple | None
    probes: list | None


def _empty_qcache(ctx, h, cfg, caches, attn: LazyAttention) -> QCache:
    """A zero carry with the structure an anchor produces, for a traced schedule (both
    ``lax.cond`` branches, and the scan carry, need it before the first anchor has run)."""
    b, dt = h.shape[0], h.dtype
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if isinstance(ctx, SequencePass):
        t = h.shape[1]
        return QCache(jnp.zeros((b, hq, t, d), dt), (jnp.zeros((b, hkv, t, d), dt),))
    c = caches[0]
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
) -> StackOutput:
    """Run the decoder ``layers`` on hidden states ``h`` [B, T, hidden] in pass ``ctx``.

    ``lazy``: a :class:`Schedule` (its mode must be ``attn.mode``), or a traced boolean array
    [L] (only for passes without caches: the cache's structure needs a static schedule).
    ``caches``: the layers' cache segments in decode, laid out for the schedule; a prefill
    pass creates them (and returns them in either case).
    ``cfg``: the :class:`~qcache_jax.config.TextConfig`. Both ``loop`` values compute the same
    numbers.
    """
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
