"""Llama-family decoder layer (RMSNorm, RoPE attention with GQA, SwiGLU) and the text model.

A layer exposes its steps separately (queries, keys, values, output) because Lazy Attention
runs only some of them: a GLA lazy layer never calls ``queries`` or ``keys``.
"""

from __future__ import annotations

from flax import nnx

from .config import TextConfig
from .layers import Embed, Linear, RMSNorm, activation, stacked
from .rope import apply_rope


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer, split into the steps Lazy Attention schedules separately."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def attn_input(self, h):
        return self.input_layernorm(h)

    def queries(self, x, cos, sin):
        """Post-RoPE queries [B, T, Hq, D]: what the Q Cache holds for an anchor."""
        q = self.self_attn.q_proj(x).reshape(*x.shape[:2], self.num_heads, self.head_dim)
        return apply_rope(q, cos, sin)

    def keys(self, x, cos, sin):
        """Post-RoPE keys [B, T, Hkv, D], as stored in the KV cache."""
        k = self.self_attn.k_proj(x).reshape(*x.shape[:2], self.num_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin)

    def values(self, x):
        return self.self_attn.v_proj(x).reshape(*x.shape[:2], self.num_kv_heads, self.head_dim)

    def output(self, h, attn):
        """Residual stream after the attention output ``attn`` [B, T, Hq, D] and the MLP."""
        h = h + self.self_attn.o_proj(attn.reshape(*attn.shape[:2], -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class LanguageModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = stacked(cfg.num_layers, lambda r: DecoderLayer(cfg, dtype=dtype, rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
