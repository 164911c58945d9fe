"""Llama-family decoder layer (RMSNorm, RoPE attention with GQA, SwiGLU) and the text model.

A layer exposes its steps separately (queries, keys, values, output) because Lazy Attention
runs only some of them: a GLA lazy layer never calls ``queries`` or ``keys``. Queries, keys
and values are head-major ([B, H, T, D]), the layout of the KV cache.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ..config import TextConfig
from .layers import Embed, GatedMlp, Linear, RMSNorm, layer_list
from .rope import apply_rope, inverse_frequencies, mrope_angles, rope_angles


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)


def _heads(y, n_heads: int, head_dim: int):
    """[B, T, H * D] -> head-major [B, H, T, D]."""
    b, t, _ = y.shape
    return y.reshape(b, t, n_heads, head_dim).transpose(0, 2, 1, 3)


class DecoderLayer(nnx.Module):
    """One decoder layer, split into the steps Lazy Attention schedules separately."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMlp(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias, dtype=dtype,
                            rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def attn_input(self, h):
        return self.input_layernorm(h)

    def queries(self, x, cos, sin):
        """Post-RoPE queries [B, Hq, T, D]: what the Q Cache holds for an anchor."""
        return apply_rope(_heads(self.self_attn.q_proj(x), self.num_heads, self.head_dim), cos, sin)

    def keys(self, x, cos, sin):
        """Post-RoPE keys [B, Hkv, T, D], as stored in the KV cache."""
        return apply_rope(_heads(self.self_attn.k_proj(x), self.num_kv_heads, self.head_dim), cos, sin)

    def values(self, x):
        """Values [B, Hkv, T, D]."""
        return _heads(self.self_attn.v_proj(x), self.num_kv_heads, self.head_dim)

    def output(self, h, attn):
        """Residual stream after the attention output ``attn`` [B, Hq, T, D] and the MLP."""
        b, hq, t, d = attn.shape
        h = h + self.self_attn.o_proj(attn.transpose(0, 2, 1, 3).reshape(b, t, hq * d))
        return h + self.mlp(self.post_attention_layernorm(h))


class LanguageModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = layer_list(cfg.num_layers, lambda r: DecoderLayer(cfg, dtype=dtype, rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


def scatter_features(emb, is_img, feats):
    """``emb`` [B, T, D] with the k-th image position of the batch (row-major) replaced by row
    k of ``feats`` [K, D], as HF's ``masked_scatter``. Rows of ``feats`` past the batch's image
    positions are ignored, so feature counts can be bucketed."""
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats.shape[0] - 1).reshape(is_img.shape)
    return jnp.where(is_img[..., None], feats[idx].astype(emb.dtype), emb)


class MultimodalDecoder(nnx.Module):
    """What every model family shares around the one layer stack: the decoder layers, the
    visual positions, the rotary angles and the head. A family subclass builds its image modules
    and the shared parts (:meth:`_build_decoder`), and implements ``embed(input_ids, pixel_values, *, loop)``: token embeddings with its image
    features in the image-token positions."""

    def _build_decoder(self, cfg, dtype, rngs: nnx.Rngs):
        """The shared parts: ``language_model``, ``lm_head`` (None when tied) and ``cfg``."""
        self.language_model = LanguageModel(cfg.text, dtype=dtype, rngs=rngs)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        else:
            self.lm_head = None
        self.cfg = cfg

    @property
    def layers(self):
        """The decoder layers (a list of :class:`DecoderLayer`)."""
        return list(self.language_model.layers)

    def is_image(self, input_ids):
        """Image-token positions (the visual positions VLA inherits), all False for text-only."""
        if self.cfg.image_token_id is None:
            return jnp.zeros(input_ids.shape, bool)
        return input_ids == self.cfg.image_token_id

    def head(self, h):
        """Final norm and output projection; logits in float32."""
        h = self.language_model.norm(h)
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def rope(self, positions):
        """cos and sin [B, T, head_dim] for RoPE positions [B, T], or [3, B, T] for M-RoPE
        (``text.rope.mrope_section``; a [B, T] position is all three axes equal)."""
        t = self.cfg.text
        inv = inverse_frequencies(t.rope, t.head_dim)
        if positions.ndim == 3:
            if not t.rope.mrope_section:
                raise ValueError("3-D RoPE positions need a model with M-RoPE (mrope_section)")
            return mrope_angles(positions, inv, t.rope.mrope_section)
        return rope_angles(positions, inv)
