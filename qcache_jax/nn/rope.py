"""Rotary position embedding with HF's ``default``, ``linear`` and ``llama3`` frequency rules."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ..config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], float32 as transformers computes them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.rope_type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_angles(positions, inv_freq):
    """cos and sin [B, T, head_dim] (float32) for integer ``positions`` [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate head-major ``x`` [B, H, T, D] by angles [B, T, D] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, None].astype(x.dtype), sin[:, None].astype(x.dtype)
    return x * c + rotated * s


def mrope_angles(positions, inv_freq, section):
    """M-RoPE cos and sin [B, T, head_dim] for positions [3, B, T] (temporal, height, width).

    The rotary pairs are cut into ``section`` consecutive groups (transformers'
    ``mrope_section``, summing to head_dim // 2); group i turns by position axis i % 3. Where the
    three positions are equal (text tokens) this is :func:`rope_angles` exactly.
    """
    axis = np.repeat(np.arange(len(section)) % 3, section)  # [head_dim // 2]: each pair's axis
    if axis.shape[0] != np.asarray(inv_freq).shape[0]:
        raise ValueError(f"mrope_section {tuple(section)} does not cover {np.asarray(inv_freq).shape[0]} rotary pairs")
    picked = jnp.moveaxis(positions.astype(jnp.float32)[axis], 0, -1)  # [B, T, head_dim // 2]
    freqs = picked * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
