"""The LLaVA model (NNX modules) and its pure full-sequence forward.

``Llava`` holds the parameters with Hugging Face's names. The forward is a pure function of
(graphdef, params, inputs): decoder layers are stacked on a leading axis and applied with
``lax.scan`` (or unrolled, same layer code), with the Lazy Attention schedule as a scanned
per-layer mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LlavaConfig
from .decoder import LanguageModel
from .layers import Linear, scan_layers
from .lazy_attention import LazyAttention, QCache
from .rope import inverse_frequencies, rope_angles
from .vision import Projector, VisionTower


class Llava(nnx.Module):
    """LlavaForConditionalGeneration with HF parameter names (``lm_head`` absent when tied)."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.vision_tower = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, dtype=dtype, rngs=rngs)
        self.language_model = LanguageModel(cfg.text, dtype=dtype, rngs=rngs)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        else:
            self.lm_head = None
        self.cfg = cfg

    def image_features(self, pixel_values, *, unroll: bool = False):
        """Projected image features [N, tokens_per_image, hidden] for ``pixel_values`` [N, C, H, W]."""
        hs = self.vision_tower(pixel_values, self.cfg.feature_layers, unroll=unroll)
        if self.cfg.vision_feature_select_strategy == "default":
            hs = [h[:, 1:] for h in hs]
        return self.multi_modal_projector(jnp.concatenate(hs, axis=-1))

    def embed(self, input_ids, pixel_values=None, *, unroll: bool = False):
        """Token embeddings with image features scattered into the image-token positions.

        Like HF's ``masked_scatter``: the k-th image token of the batch (row-major) receives the
        k-th feature row. Extra (padding) features are ignored, so image counts can be bucketed.
        """
        emb = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return emb
        feats = self.image_features(pixel_values, unroll=unroll).astype(emb.dtype)
        feats = feats.reshape(-1, feats.shape[-1])
        is_img = input_ids == self.cfg.image_token_id
        idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats.shape[0] - 1).reshape(is_img.shape)
        return jnp.where(is_img[..., None], feats[idx], emb)

    def head(self, h):
        """Final norm and output projection; logits in float32."""
        h = self.language_model.norm(h)
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def rope(self, positions):
        t = self.cfg.text
        return rope_angles(positions, inverse_frequencies(t.rope, t.head_dim))


def forward(
    model: Llava,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    lazy=None,
    *,
    mode: str = "vla",
    unroll: bool = False,
    attention_impl: str = "auto",
):
    """Full-sequence logits [B, T, V] float32, with an optional Lazy Attention schedule.

    ``lazy``: None (dense) or a boolean array [L] (layer 0 must be False). Positions are
    ``arange(T)`` and ``attention_mask`` masks keys, exactly as HF's forward without a cache.
    """
    b, t = input_ids.shape
    h = model.embed(input_ids, pixel_values, unroll=unroll)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    cos, sin = model.rope(positions)
    lazy_attn = LazyAttention(mode=mode, impl=attention_impl)
    vis = input_ids == model.cfg.image_token_id
    n_layers = model.cfg.text.num_layers
    flags = jnp.zeros((n_layers,), bool) if lazy is None else jnp.asarray(lazy, bool)

    def body(layer, carry, is_lazy):
        h, qc = carry
        attn, qc = lazy_attn.full_sequence(
            layer, layer.attn_input(h), cos, sin, positions, valid, vis, qc, is_lazy, dense=lazy is None
        )
        return (layer.output(h, attn), qc), None

    qc0 = QCache.empty(b, t, model.cfg.text, h.dtype) if lazy is not None else None
    (h, _), _ = scan_layers(model.language_model.layers, body, (h, qc0), flags, unroll=unroll)
    return model.head(h)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "unroll", "attention_impl"))
def logits_fn(graphdef, params, input_ids, pixel_values, attention_mask, lazy, *, mode, unroll, attention_impl):
    """Jitted :func:`forward` over a parameter pytree (the functional boundary)."""
    model = nnx.merge(graphdef, params)
    return forward(
        model, input_ids, pixel_values, attention_mask, lazy, mode=mode, unroll=unroll, attention_impl=attention_impl
    )
