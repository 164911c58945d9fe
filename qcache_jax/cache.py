"""The decoding state: a lazy KV cache whose arrays are really smaller, plus the Q Cache.

Every row's cache has two segments: a *visual* segment (the image-token positions of the
prompt) and a *text* segment (prompt text, then generated tokens). Attention does not depend on
key order (position-based causal mask), so the segments are attended separately and merged
exactly by log-sum-exp. Per layer:

===========  =========  =========  =====  =====
layer        K visual   K text     V vis  V txt
===========  =========  =========  =====  =====
dense/anchor  yes       yes        yes    yes
GLA lazy      no        no         yes    yes
VLA lazy      no        yes        yes    yes
===========  =========  =========  =====  =====

A lazy layer reads the missing keys from its anchor's cache. Arrays are per layer (a tuple, not
a stacked array) because a decode step that slices per-layer caches out of a stacked array
copies them every layer, every step (method.md, "Measured design facts").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import TextConfig


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static shape of a decoding state: one per (batch bucket, length bucket, schedule, mode)."""

    batch: int
    image_len: int  # S_img: visual-segment capacity per row
    text_len: int  # S_txt: text-segment capacity per row (prompt text + generated tokens)
    schedule: tuple[bool, ...]
    mode: str

    def stores_k(self, layer: int) -> tuple[bool, bool]:
        """(stores visual K, stores text K) for ``layer``."""
        if not self.schedule[layer]:
            return True, True
        return False, self.mode == "vla"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's cache segments [B, S, Hkv, D]; a key array is None where the layer stores none."""

    k_img: jax.Array | None
    k_txt: jax.Array | None
    v_img: jax.Array
    v_txt: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodingState:
    """Everything a decode step reads and writes; donated to the jitted prefill and decode.

    ``q_cache``: the Q Cache, the latest anchor's post-RoPE queries of the last step
    [B, Hq, D] (transient within a step; kept here so that shapes stay static under jit).
    ``n_img`` / ``n_txt``: valid entries per row in each segment; ``positions``: the position
    of each row's next token.
    """

    layers: tuple[LayerCache, ...]
    q_cache: jax.Array
    n_img: jax.Array
    n_txt: jax.Array
    positions: jax.Array


def init_state(layout: CacheLayout, cfg: TextConfig, dtype) -> DecodingState:
    """A zeroed state whose arrays exist only where the schedule stores them."""
    b, hkv, d = layout.batch, cfg.num_kv_heads, cfg.head_dim

    def seg(n):
        return jnp.zeros((b, n, hkv, d), dtype)

    layers = []
    for i in range(cfg.num_layers):
        k_img, k_txt = layout.stores_k(i)
        layers.append(
            LayerCache(
                k_img=seg(layout.image_len) if k_img else None,
                k_txt=seg(layout.text_len) if k_txt else None,
                v_img=seg(layout.image_len),
                v_txt=seg(layout.text_len),
            )
        )
    zeros = jnp.zeros((b,), jnp.int32)
    return DecodingState(
        layers=tuple(layers),
        q_cache=jnp.zeros((b, cfg.num_heads, d), dtype),
        n_img=zeros,
        n_txt=zeros,
        positions=zeros,
    )


def kv_cache_bytes(state_or_shapes) -> int:
    """Bytes of the KV arrays that exist (the Q Cache and counters are not KV cache)."""
    return sum(int(x.size) * x.dtype.itemsize for layer in state_or_shapes.layers for x in jax.tree.leaves(layer))


def dense_kv_cache_bytes(layout: CacheLayout, cfg: TextConfig, dtype) -> int:
    """The same shapes with no lazy layer: 2 * L * B * (S_img + S_txt) * Hkv * D * itemsize."""
    per = layout.batch * (layout.image_len + layout.text_len) * cfg.num_kv_heads * cfg.head_dim
    return 2 * cfg.num_layers * per * jnp.dtype(dtype).itemsize
