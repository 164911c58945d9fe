"""Next-token sampling: greedy, temperature, top-k and top-p, with traced (not static) settings
so that changing them never recompiles.

:func:`sample` takes one setting for the whole batch and one key (``generate``);
:func:`sample_rows` takes a setting and a key per row (the serving slots, where every slot
holds another request with its own temperature and seed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _filtered(logits, temperature, top_k, top_p):
    """Temperature-scaled logits [B, V] with everything outside top-k / top-p at -inf; the
    settings are scalars or per-row arrays [B]."""
    b, v = logits.shape
    temperature, top_k, top_p = (jnp.broadcast_to(x, (b,))[:, None] for x in (temperature, top_k, top_p))
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1), axis=-1)
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    desc = jnp.where((top_k > 0) & (desc < kth), -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep_sorted = before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)


def _greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(logits, key, temperature, top_k, top_p):
    """Tokens [B] from logits [B, V] (float32).

    ``temperature`` <= 0 means greedy (argmax); ``top_k`` <= 0 and ``top_p`` >= 1 disable
    those filters. All three are scalars (traced). Greedy decoding runs only the argmax: the
    sort and the random draw over the vocabulary sit behind a ``lax.cond``.
    """

    def draw():
        return jax.random.categorical(key, _filtered(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda: _greedy(logits))


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Tokens [B] from logits [B, V], row ``i`` drawn with its own key ``keys[i]`` and settings
    ``temperature[i]``, ``top_k[i]``, ``top_p[i]`` (arrays [B]; temperature <= 0: greedy).

    A row's draw depends only on its own key and logits, so a request's tokens do not depend
    on which slot it sits in or who shares the batch. The sort runs only when some row samples.
    """

    def draw():
        filtered = _filtered(logits, temperature, top_k, top_p)
        drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, _greedy(logits))

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: _greedy(logits))
