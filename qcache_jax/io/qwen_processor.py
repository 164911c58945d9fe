"""Qwen2-VL's processor without its video half.

transformers' ``Qwen2VLProcessor`` always builds a video processor, which needs torchvision;
this project takes images only. :class:`QwenImageProcessor` does what that processor does for
images and text: the checkpoint's own HF image processor (its ``min_pixels`` / ``max_pixels``
resize, normalisation and patch flattening) gives ``pixel_values`` and ``image_grid_thw``, and
each ``<|image_pad|>`` of the text becomes one token per merged 2x2 patch block of its image
before tokenizing. The chat template is the checkpoint's (``chat_template.jinja`` /
``chat_template.json``, else the tokenizer's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import QCacheError


class QwenImageProcessor:
    """The processor interface :class:`~qcache_jax.api.QCacheModel` uses (``__call__``,
    ``apply_chat_template``, ``chat_template``, ``tokenizer``) for a Qwen2-VL checkpoint."""

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, image_token: str = "<|image_pad|>"):
        self.image_processor, self.tokenizer, self.image_token = image_processor, tokenizer, image_token
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path) -> "QwenImageProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return cls(AutoImageProcessor.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)), template)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, images=None, text=None, return_tensors="np"):
        """``input_ids`` [1, T] (image-pad tokens expanded), ``pixel_values`` [N_patches, C*T*P*P]
        and ``image_grid_thw`` [N, 3] for one text and its images, as ``Qwen2VLProcessor``."""
        (text,) = text
        out = {}
        if images:
            enc = self.image_processor(images=list(images), return_tensors="np")
            grid = np.asarray(enc["image_grid_thw"])
            merge = int(self.image_processor.merge_size) ** 2
            parts = text.split(self.image_token)
            if len(parts) - 1 != len(grid):
                raise QCacheError(f"the prompt has {len(parts) - 1} image placeholder(s) for {len(grid)} image(s)")
            text = parts[0] + "".join(self.image_token * int(np.prod(g) // merge) + p for g, p in zip(grid, parts[1:]))
            out.update(pixel_values=np.asarray(enc["pixel_values"], np.float32), image_grid_thw=grid)
        out["input_ids"] = np.asarray([self.tokenizer(text)["input_ids"]])
        return out
