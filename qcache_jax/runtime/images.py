"""The engine's side of the model-family seam: how a family's images enter a plan.

Each family's images differ in what a batch of them is on the host and inside ``jit``, and in
how their token counts follow from the prompts. :func:`image_inputs` returns the family's
:class:`ImageInputs`, and the engine and the API only call its four methods:

* :meth:`~ImageInputs.plan`: the visual segment's length, the text length and the image buckets
  of a batch of prompts;
* :meth:`~ImageInputs.abstract`: the ShapeDtypeStructs a plan's prefill takes (pixels, RoPE);
* :meth:`~ImageInputs.prepare`: the host arrays of one batch, padded to the plan's buckets;
* :meth:`~ImageInputs.model_inputs`: the same for a full-sequence pass (logits, calibration).

``rope`` is None when the RoPE positions are the token indices (the LLaVA family); Qwen2-VL's
is its M-RoPE positions [3, B, T] and each row's next position [B].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..nn import anyres
from .buckets import bucket, pow2


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """What a batch's images fix in a plan: ``image_len`` (the visual segment per row),
    ``n_text`` (the longest row's text tokens), ``n_images`` (padded images; LLaVA-NeXT: views,
    Qwen2-VL: patches) and ``n_image_tokens`` (LLaVA-NeXT: the packing index length)."""

    image_len: int
    n_text: int
    n_images: int
    n_image_tokens: int = 0


def _visual_counts(cfg, prompts) -> list[int]:
    return [sum(1 for t in p if t == cfg.image_token_id) for p in prompts] if cfg.has_vision else [0] * len(prompts)


def _struct(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


class ImageInputs:
    """LLaVA-1.5 (and text-only): a fixed token count per image, pixels [N, C, H, W]."""

    def __init__(self, cfg):
        self.cfg = cfg

    def plan(self, prompts, n_images_per_row) -> ImagePlan:
        per = self.cfg.image_tokens_per_image
        n_text = max(len(p) - k * per for p, k in zip(prompts, n_images_per_row))
        per_row = max(n_images_per_row)
        n_images = pow2(sum(n_images_per_row)) if any(n_images_per_row) else 0
        return ImagePlan(image_len=(pow2(per_row) if per_row else 0) * per, n_text=n_text, n_images=n_images)

    def abstract(self, plan):
        """(pixels, rope) as ShapeDtypeStructs for ``plan`` (an engine Plan)."""
        if not plan.n_images:
            return None, None
        v = self.cfg.vision
        return jax.ShapeDtypeStruct((plan.n_images, v.num_channels, v.image_size, v.image_size), jnp.float32), None

    def prepare(self, ids, lens, pixel_values, plan):
        """Host (pixels, rope) of one batch: ``ids`` [B, T] right-padded, ``lens`` [B]."""
        if not plan.n_images:
            return None, None
        pv = np.zeros((plan.n_images, *pixel_values.shape[1:]), np.float32)
        pv[: len(pixel_values)] = pixel_values
        return pv, None

    def model_inputs(self, input_ids, valid, pixel_values, meta=None):
        """(pixels, rope) of a full-sequence pass; ``pixel_values``/``meta`` as
        :meth:`~qcache_jax.api.QCacheModel.encode` returns them."""
        return pixel_values, None


class AnyresImages(ImageInputs):
    """LLaVA-NeXT: an image's token count depends on its size, so rows differ; the visual
    segment is bucketed on the longest row, the views on the image count (at the most views
    an image can have), the packing index on the batch's image tokens."""

    def plan(self, prompts, n_images_per_row) -> ImagePlan:
        vis = _visual_counts(self.cfg, prompts)
        n_images = pow2(sum(n_images_per_row)) if any(n_images_per_row) else 0
        return ImagePlan(image_len=bucket(max(vis)) if max(vis) else 0,
                         n_text=max(len(p) - v for p, v in zip(prompts, vis)),
                         n_images=n_images * anyres.max_views(self.cfg),
                         n_image_tokens=bucket(sum(vis)) if sum(vis) else 0)

    def abstract(self, plan):
        views, _ = super().abstract(plan)
        if views is None:
            return None, None
        return anyres.AnyresPixels(views, jax.ShapeDtypeStruct((plan.n_image_tokens,), jnp.int32)), None

    def prepare(self, ids, lens, pixel_values, plan):
        if not plan.n_images:
            return None, None
        return anyres.pad(pixel_values, plan.n_images, plan.n_image_tokens), None

    def model_inputs(self, input_ids, valid, pixel_values, meta=None):
        return (None if pixel_values is None else anyres.pack(pixel_values, meta, self.cfg)), None


class QwenImages(ImageInputs):
    """Qwen2-VL: every visual token is ``merge_unit`` patches of its image, so a batch's patch
    count follows from its image-pad tokens; patches and the visual segment are bucketed. The
    host also computes the M-RoPE positions (:mod:`qcache_jax.nn.mrope`)."""

    def _patches(self, visual_tokens: int) -> int:
        """The padded patch count of a batch of ``visual_tokens`` image-pad tokens: merge_unit
        patches per token, the tokens bucketed to a power of two (0 without images)."""
        return self.cfg.vision.merge_unit * pow2(visual_tokens) if visual_tokens else 0

    def plan(self, prompts, n_images_per_row) -> ImagePlan:
        vis = _visual_counts(self.cfg, prompts)
        return ImagePlan(image_len=bucket(max(vis)) if max(vis) else 0,
                         n_text=max(len(p) - v for p, v in zip(prompts, vis)),
                         n_images=self._patches(sum(vis)))

    def abstract(self, plan):
        from ..nn.qwen_vision import pack_pixels

        b, t, pv = plan.prefill_batch, plan.prompt_len, None
        if plan.n_images:  # the struct of a packed batch of n_images patches (values unused)
            v = self.cfg.vision
            dummy = pack_pixels(np.zeros((plan.n_images, v.patch_dim), np.float32),
                                np.asarray([[1, v.spatial_merge_size, plan.n_images // v.spatial_merge_size]]), v,
                                patches=plan.n_images)
            pv = _struct(dummy)
        return pv, (jax.ShapeDtypeStruct((3, b, t), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))

    def prepare(self, ids, lens, pixel_values, plan):
        """``pixel_values``: None or (pixel_values [N_patches, C*T*P*P], image_grid_thw [N, 3])."""
        from ..nn.qwen2_vl import prepare_inputs

        valid = np.arange(ids.shape[1])[None, :] < np.asarray(lens)[:, None]
        pv, grid = (None, None) if pixel_values is None else pixel_values
        pixels, positions, nxt = prepare_inputs(self.cfg, ids, valid, pv, grid, patches=plan.n_images or None)
        return pixels, (positions, nxt)

    def model_inputs(self, input_ids, valid, pixel_values, meta=None):
        from ..nn.qwen2_vl import prepare_inputs

        patches = self._patches(int((np.asarray(input_ids) == self.cfg.image_token_id).sum())) or None
        pixels, positions, _ = prepare_inputs(self.cfg, input_ids, valid, pixel_values, meta, patches=patches)
        return pixels, positions


FAMILY_IMAGES = {"llava": ImageInputs, "qwen2_vl": QwenImages, "qwen2_5_vl": QwenImages}


def image_inputs(cfg) -> ImageInputs:
    """The :class:`ImageInputs` of ``cfg``'s family (LLaVA-NeXT: the anyres kind of LLaVA's)."""
    if cfg.anyres:
        return AnyresImages(cfg)
    return FAMILY_IMAGES[cfg.family](cfg)
