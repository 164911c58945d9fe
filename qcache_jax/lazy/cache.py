"""The decoding state: a lazy KV cache whose arrays are really smaller.

Every row's cache has two segments: a *visual* segment (the image-token positions of the
prompt) and a *text* segment (prompt text, then generated tokens). Attention does not depend on
key order (position-based causal mask), so the segments are attended separately and merged
exactly by log-sum-exp. Per layer, as :meth:`Schedule.stores_k` says:

===========  =========  =========  =====  =====
layer        K visual   K text     V vis  V txt
===========  =========  =========  =====  =====
dense/anchor  yes       yes        yes    yes
GLA lazy      no        no         yes    yes
VLA lazy      no        yes        yes    yes
===========  =========  =========  =====  =====

A lazy layer reads the missing keys from its anchor's cache. Segments are head-major
[B, Hkv, S, D], the layout the attention kernels read (no per-step transpose), and there is one
array per layer and segment (a tuple, not a stacked array): a decode step that slices per-layer
caches out of a stacked array copies them every layer, every step (docs/method.md).

The Q Cache is *not* here: it is transient, carried layer to layer inside one pass
(:class:`qcache_jax.lazy.attention.QCache`); between decode steps only what persists is kept.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..config import TextConfig
from .fastv import FastV
from .schedule import Schedule


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static shape of a decoding state: one per (batch bucket, length buckets, schedule)."""

    batch: int
    image_len: int  # S_img: visual-segment capacity per row
    text_len: int  # S_txt: text-segment capacity per row (prompt text + generated tokens)
    schedule: Schedule
    fastv: FastV | None = None  # visual tokens pruned after layer K: shorter visual segments above it

    def dense(self) -> "CacheLayout":
        """The same shapes with no lazy layer and no pruning (what a dense model would allocate)."""
        return dataclasses.replace(self, schedule=Schedule.dense(self.schedule.num_layers), fastv=None)

    def image_len_of(self, layer: int) -> int:
        """Visual-segment capacity of ``layer``: ``image_len``, or with FastV above layer K
        the kept share of it, ``fastv.kept(image_len)``."""
        if self.fastv is not None and layer > self.fastv.layer:
            return self.fastv.kept(self.image_len)
        return self.image_len


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's cache segments [B, Hkv, S, D]; a key array is None where the layer stores none."""

    k_img: jax.Array | None
    k_txt: jax.Array | None
    v_img: jax.Array
    v_txt: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodingState:
    """Everything that persists between decode steps; donated to the jitted prefill and decode.

    ``layers``: one :class:`LayerCache` per decoder layer. ``n_img`` / ``n_txt``: valid entries
    per row in each segment (with FastV, ``n_img`` is the unpruned count: the layers above K hold
    ``fastv.kept(n_img)``, derived, not stored); ``positions``: the position of each row's next token.
    """

    layers: tuple[LayerCache, ...]
    n_img: jax.Array
    n_txt: jax.Array
    positions: jax.Array


def init_state(layout: CacheLayout, cfg: TextConfig, dtype) -> DecodingState:
    """A zeroed state whose key arrays exist only where the schedule stores them."""
    b, hkv, d = layout.batch, cfg.num_kv_heads, cfg.head_dim

    def seg(n):
        return jnp.zeros((b, hkv, n, d), dtype)

    layers = []
    for i in range(cfg.num_layers):
        k_img, k_txt = layout.schedule.stores_k(i)
        layers.append(
            LayerCache(
                k_img=seg(layout.image_len_of(i)) if k_img else None,
                k_txt=seg(layout.text_len) if k_txt else None,
                v_img=seg(layout.image_len_of(i)),
                v_txt=seg(layout.text_len),
            )
        )
    zeros = jnp.zeros((b,), jnp.int32)
    return DecodingState(layers=tuple(layers), n_img=zeros, n_txt=zeros, positions=zeros)


def state_shapes(layout: CacheLayout, cfg: TextConfig, dtype) -> DecodingState:
    """The state :func:`init_state` would allocate, as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_state, layout, cfg, jnp.dtype(dtype)))


def kv_cache_bytes(state: DecodingState) -> int:
    """Bytes of the KV arrays a state holds (real arrays or ShapeDtypeStructs); the counters
    are not KV cache. The one KV-byte counter: for a layout, ``kv_cache_bytes(state_shapes(...))``."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for layer in state.layers for x in jax.tree.leaves(layer))


def layout_kv_bytes(layout: CacheLayout, cfg: TextConfig, dtype) -> tuple[int, int]:
    """(KV bytes, dense KV bytes) of ``layout``, from the array shapes :func:`init_state` makes."""
    return _layout_kv_bytes(layout, cfg, jnp.dtype(dtype))


@functools.lru_cache(maxsize=64)
def _layout_kv_bytes(layout: CacheLayout, cfg: TextConfig, dtype) -> tuple[int, int]:
    # Tracing init_state costs ~0.5 s; generate asks for the same layout on every call.
    return (
        kv_cache_bytes(state_shapes(layout, cfg, dtype)),
        kv_cache_bytes(state_shapes(layout.dense(), cfg, dtype)),
    )
