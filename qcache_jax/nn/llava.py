"""The LLaVA model as NNX modules with Hugging Face's parameter names.

``Llava`` holds the parameters (``lm_head`` absent when tied; ``vision_tower`` and
``multi_modal_projector`` absent for a text-only checkpoint). The decoder layers are run by
:func:`qcache_jax.lazy.stack.run_layers`; this module provides what comes before them (token
embeddings with image features scattered in) and after them (final norm and head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import LlavaConfig
from .anyres import AnyresPixels, gather_features
from .decoder import MultimodalDecoder, scatter_features
from .vision import Projector, VisionTower


class Llava(MultimodalDecoder):
    """LlavaForConditionalGeneration (or, without a vision config, a ``*ForCausalLM``)."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        if cfg.vision is not None:
            self.vision_tower = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
            self.multi_modal_projector = Projector(cfg, dtype=dtype, rngs=rngs)
        else:
            self.vision_tower = self.multi_modal_projector = None
        if cfg.anyres:  # LLaVA-NeXT: the learned embedding after every row of an image's tile grid
            d = cfg.text.hidden_size
            self.image_newline = nnx.Param((jax.random.normal(rngs.params(), (d,)) / d**0.5).astype(dtype))
        self._build_decoder(cfg, dtype, rngs)

    def image_features(self, pixel_values, *, loop: str = "scan"):
        """Projected image features [N, tokens_per_image, hidden] for ``pixel_values`` [N, C, H, W]
        (for LLaVA-NeXT: per view, base or tile)."""
        hs = self.vision_tower(pixel_values, self.cfg.feature_layers, loop=loop)
        if self.cfg.vision_feature_select_strategy == "default":
            hs = [h[:, 1:] for h in hs]
        return self.multi_modal_projector(jnp.concatenate(hs, axis=-1))

    def embed(self, input_ids, pixel_values=None, *, loop: str = "scan"):
        """Token embeddings with image features scattered into the image-token positions.

        Like HF's ``masked_scatter``: the k-th image token of the batch (row-major) receives the
        k-th feature row. Extra (padding) features are ignored, so image counts can be bucketed.
        ``pixel_values``: [N, C, H, W] (LLaVA-1.5), or for LLaVA-NeXT an
        :class:`~qcache_jax.nn.anyres.AnyresPixels` (views and the host-computed packing index:
        base view, unpadded tiles and ``image_newline`` rows in HF's order).
        """
        emb = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return emb
        if isinstance(pixel_values, AnyresPixels):
            views = self.image_features(pixel_values.views, loop=loop)
            feats = gather_features(views, self.image_newline[...], pixel_values.index).astype(emb.dtype)
        else:
            feats = self.image_features(pixel_values, loop=loop).astype(emb.dtype)
            feats = feats.reshape(-1, feats.shape[-1])
        return scatter_features(emb, input_ids == self.cfg.image_token_id, feats)
