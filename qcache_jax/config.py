"""Model configuration as frozen dataclasses.

The converter turns a ``transformers`` config (which fills in the family defaults that a Hub
``config.json`` leaves out) into these explicit dataclasses once (:mod:`qcache_jax.io.hf_config`);
everything downstream reads only these, so a saved checkpoint is self-describing and needs no
transformers config to run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any



@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` is ``default``, ``linear`` or ``llama3``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama-family decoder (Llama, Mistral and Qwen2 backbones)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA model: vision tower, projector and text decoder. A text-only checkpoint (a
    ``*ForCausalLM``) has ``vision`` and ``image_token_id`` None and no image tokens."""

    vision: VisionConfig | None
    text: TextConfig
    image_token_id: int | None
    image_seq_length: int
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    dtype: str = "float32"
    # LLaVA-NeXT ("anyres"): the tile grids an image may be resized to, (height, width) pixels
    # each, multiples of the vision image_size. None: LLaVA-1.5 (one fixed-size view per image).
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def anyres(self) -> bool:
        """A LLaVA-NeXT model: an image is a base view plus tiles, with a learned
        ``image_newline``, and its token count depends on its size
        (:func:`qcache_jax.nn.anyres.image_token_count`)."""
        return self.image_grid_pinpoints is not None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Vision feature layers as indices into CLIP's ``hidden_states`` (0 = embeddings)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_layers + 1
        return tuple(i % n for i in layers)

    @property
    def image_tokens_per_image(self) -> int:
        """Image tokens of one image (LLaVA-1.5); for LLaVA-NeXT, of one view (the base image
        or one tile): an image's count depends on its size."""
        if self.vision is None:
            return 0
        # `default` drops CLIP's class token, `full` keeps it.
        n = self.vision.num_patches
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        text = dict(d.pop("text"))
        text["rope"] = RopeConfig(**text["rope"])
        text["eos_token_id"] = tuple(text.get("eos_token_id") or ())
        vfl = d.get("vision_feature_layer", -2)
        d["vision_feature_layer"] = vfl if isinstance(vfl, int) else tuple(vfl)
        vision = d.pop("vision")
        pinpoints = d.get("image_grid_pinpoints")  # absent from configs written before LLaVA-NeXT
        d["image_grid_pinpoints"] = None if pinpoints is None else tuple(tuple(int(x) for x in p) for p in pinpoints)
        return cls(vision=None if vision is None else VisionConfig(**vision), text=TextConfig(**text), **d)
