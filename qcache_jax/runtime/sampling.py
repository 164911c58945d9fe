"""Next-token sampling: greedy, temperature, top-k and top-p, with traced (not static) settings
so that changing them never recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _draw(logits, key, temperature, top_k, top_p):
    """A token per row from the temperature-scaled distribution, top-k / top-p filtered."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    desc = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)
    v = logits.shape[-1]
    kth = jnp.take(desc, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[:, None]
    scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    desc = jnp.where((top_k > 0) & (desc < kth), -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep_sorted = before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def sample(logits, key, temperature, top_k, top_p):
    """Tokens [B] from logits [B, V] (float32).

    ``temperature`` <= 0 means greedy (argmax); ``top_k`` <= 0 and ``top_p`` >= 1 disable
    those filters. All three are scalars (traced). Greedy decoding runs only the argmax: the
    sort and the random draw over the vocabulary sit behind a ``lax.cond``.
    """
    return jax.lax.cond(
        temperature > 0,
        lambda: _draw(logits, key, temperature, top_k, top_p),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
    )
