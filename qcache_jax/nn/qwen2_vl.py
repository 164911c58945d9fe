"""Qwen2-VL and Qwen2.5-VL as NNX modules with Hugging Face's parameter names.

``visual`` (the native-resolution vision tower with its 2x2 patch merger,
:mod:`qcache_jax.nn.qwen_vision`), ``language_model`` (the Qwen2 decoder the LLaVA family uses
too) and ``lm_head`` (absent when tied). What differs from LLaVA lives here and in
:mod:`qcache_jax.nn.mrope`: the image features come from the tower's packed patches
(:class:`~qcache_jax.nn.qwen_vision.QwenPixels`), and the rotary positions are M-RoPE's three
axes, which the passes hand to :meth:`rope` as [3, B, T].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import QwenVLConfig
from ..errors import QCacheError
from .decoder import MultimodalDecoder, scatter_features
from .qwen_vision import QwenPixels, QwenVisionTower


class Qwen2VL(MultimodalDecoder):
    """Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration."""

    def __init__(self, cfg: QwenVLConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.visual = QwenVisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self._build_decoder(cfg, dtype, rngs)

    def embed(self, input_ids, pixel_values: QwenPixels | None = None, *, loop: str = "scan"):
        """Token embeddings with the merged visual tokens scattered into the image-pad positions
        (the k-th image-pad token of the batch, row-major, takes the k-th merged token)."""
        emb = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return emb
        if not isinstance(pixel_values, QwenPixels):
            raise TypeError("a Qwen2-VL model takes its images as QwenPixels (qcache_jax.nn.qwen_vision.pack_pixels)")
        feats = self.visual(pixel_values, loop=loop)
        return scatter_features(emb, input_ids == self.cfg.image_token_id, feats)


def prepare_inputs(cfg: QwenVLConfig, input_ids, valid, pixel_values=None, image_grid_thw=None, *, patches=None,
                   pack: bool = True):
    """HF-style Qwen2-VL inputs -> (QwenPixels or None, RoPE positions [3, B, T], next RoPE
    position [B]), all numpy, checked (QCacheError naming the problem).

    ``pixel_values`` [N_patches, C*T*P*P] and ``image_grid_thw`` [N, 3] as ``Qwen2VLImageProcessor``
    returns them; the batch's image-pad tokens must number the images' merged tokens. The patches
    are padded to ``patches`` (None: not padded; the runtime's buckets choose it). ``pack=False``: check only (the
    pixels come back None).
    """
    from .mrope import rope_index
    from .qwen_vision import check_pixels, merged_tokens, pack_pixels

    ids = np.asarray(input_ids)
    n_tokens = int((ids == cfg.image_token_id).sum())
    if (pixel_values is None) != (image_grid_thw is None):
        raise QCacheError("Qwen2-VL images need both pixel_values and image_grid_thw (as Qwen2VLProcessor returns them)")
    if pixel_values is None:
        if n_tokens:
            raise QCacheError(f"input_ids has {n_tokens} image tokens but no pixel_values were given")
        pos, nxt = rope_index(ids, valid, None, image_token_id=cfg.image_token_id,
                              spatial_merge_size=cfg.vision.spatial_merge_size)
        return None, pos, nxt
    grid, _, n = check_pixels(pixel_values, image_grid_thw, cfg.vision)
    need = sum(merged_tokens(grid, cfg.vision))
    if n_tokens != need:
        raise QCacheError(
            f"image features and image tokens do not match: {len(grid)} image(s) of these grids need {need} "
            f"image tokens (id {cfg.image_token_id}) in input_ids, found {n_tokens}"
        )
    pos, nxt = rope_index(ids, valid, grid, image_token_id=cfg.image_token_id,
                          spatial_merge_size=cfg.vision.spatial_merge_size)
    if not pack:
        return None, pos, nxt
    pixels = pack_pixels(pixel_values, grid, cfg.vision, patches=patches)
    return pixels, pos, nxt
