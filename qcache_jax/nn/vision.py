"""CLIP ViT vision tower and the LLaVA multimodal projector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import LlavaConfig, VisionConfig
from .attention import attend
from .layers import Embed, FcMlp, LayerNorm, Linear, activation, layer_list, layer_loop


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_heads

    def __call__(self, x):
        b, t, d = x.shape
        h = self.num_heads

        def split(y):  # [B, T, D] -> head-major [B, H, T, D / H]
            return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

        # Bidirectional attention over patches: every key visible.
        o = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), None, None,
                   jnp.ones((b, t), bool), causal=False)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, t, d))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = FcMlp(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        # Conv kernel in Flax layout HWIO (HF stores OIHW); stride = patch size, no bias.
        self.patch_embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), (p, p, c, d))).astype(dtype))
        self.class_embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), (d,))).astype(dtype))
        self.position_embedding = Embed(cfg.num_patches + 1, d, dtype=dtype, rngs=rngs)
        self.patch_size = p

    def __call__(self, pixel_values):
        kernel = self.patch_embedding[...]
        x = jax.lax.conv_general_dilated(
            pixel_values.astype(kernel.dtype),
            kernel,
            window_strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dimension_numbers=("NCHW", "HWIO", "NHWC"),
        )
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, d)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...][None]


class VisionTower(nnx.Module):
    """CLIP vision transformer; returns the hidden states LLaVA selects as image features."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.encoder = nnx.Dict(
            layers=layer_list(cfg.num_layers, lambda r: CLIPEncoderLayer(cfg, dtype=dtype, rngs=r), rngs)
        )
        # CLIP's post_layernorm only feeds the pooled output, which LLaVA never reads.
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.cfg = cfg

    def __call__(self, pixel_values, feature_layers: tuple[int, ...], *, loop: str = "scan"):
        """Hidden states at ``feature_layers`` (indices into HF's ``hidden_states``; 0 = embeddings).

        Only the layers up to the deepest requested one run: LLaVA-1.5 reads layer -2, so the
        last CLIP layer is skipped entirely.
        """
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        deepest = max(feature_layers)
        out = {0: h}
        if deepest > 0:

            def body(layer, x, _):
                x = layer(x)
                return x, x

            _, hs = layer_loop(list(self.encoder["layers"])[:deepest], body, h, loop=loop)
            out.update({i: hs[i - 1] for i in feature_layers if i > 0})
        return [out[i] for i in feature_layers]


class Projector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype, rngs: nnx.Rngs):
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        d = cfg.text.hidden_size
        self.linear_1 = Linear(d_in, d, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(d, d, bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))
