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
class QwenVisionConfig:
    """The Qwen2-VL / Qwen2.5-VL vision transformer (``variant``: ``qwen2_vl`` or ``qwen2_5_vl``).

    ``embed_dim``: the tower's width; ``out_hidden_size``: the patch merger's output (the text
    model's hidden size). Qwen2-VL: LayerNorm blocks with an fc1/fc2 MLP; Qwen2.5-VL: RMSNorm
    blocks with a gated MLP and window attention (``window_size`` pixels) except in
    ``fullatt_block_indexes``.
    """

    variant: str
    depth: int
    embed_dim: int
    out_hidden_size: int
    num_heads: int
    intermediate_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch, as the HF image processor emits them (C * T * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one visual token."""
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` is ``default``, ``linear`` or ``llama3``."""

    theta: float = 10000.0
    rope_type: str = "default"
    # Qwen2-VL's M-RoPE: the rotary pairs split into (temporal, height, width) sections, each
    # rotated by its own position; empty for 1-D RoPE. A text token has all three positions
    # equal, which is 1-D RoPE exactly.
    mrope_section: tuple[int, ...] = ()
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


class _SavedConfig:
    """A model config's saved form (``qcache_config.json``): the dataclass as plain JSON."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class LlavaConfig(_SavedConfig):
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

    family = "llava"  # not a field: configs saved before the family seam name none

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        d.pop("family", None)
        text = _text_from_dict(d.pop("text"))
        vfl = d.get("vision_feature_layer", -2)
        d["vision_feature_layer"] = vfl if isinstance(vfl, int) else tuple(vfl)
        vision = d.pop("vision")
        pinpoints = d.get("image_grid_pinpoints")  # absent from configs written before LLaVA-NeXT
        d["image_grid_pinpoints"] = None if pinpoints is None else tuple(tuple(int(x) for x in p) for p in pinpoints)
        return cls(vision=None if vision is None else VisionConfig(**vision), text=text, **d)


def _text_from_dict(text: dict[str, Any]) -> TextConfig:
    text = dict(text)
    rope = dict(text["rope"])
    rope["mrope_section"] = tuple(rope.get("mrope_section") or ())
    text["rope"] = RopeConfig(**rope)
    text["eos_token_id"] = tuple(text.get("eos_token_id") or ())
    return TextConfig(**text)


@dataclasses.dataclass(frozen=True)
class QwenVLConfig(_SavedConfig):
    """A Qwen2-VL / Qwen2.5-VL model (``family``: ``qwen2_vl`` or ``qwen2_5_vl``): the native-
    resolution vision tower with its patch merger, and a Qwen2 decoder with M-RoPE
    (``text.rope.mrope_section``). An image's visual tokens are its ``image_token_id`` (image-pad)
    tokens; how many depends on its size (``image_grid_thw``), and the prompt brackets them with
    ``vision_start_token_id`` / ``vision_end_token_id``."""

    family: str
    vision: QwenVisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    dtype: str = "float32"

    # What the rest of the library asks any model config (the LLaVA-only features are off).
    has_vision = True
    anyres = False
    image_tokens_per_image = 0  # variable: set by each image's grid
    image_seq_length = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QwenVLConfig":
        d = dict(d)
        vision = dict(d.pop("vision"))
        vision["fullatt_block_indexes"] = tuple(vision.get("fullatt_block_indexes") or ())
        return cls(vision=QwenVisionConfig(**vision), text=_text_from_dict(d.pop("text")), **d)


# The model families, by the ``family`` a saved config names (LLaVA configs, older than the
# field, name none).
ModelConfig = LlavaConfig | QwenVLConfig
FAMILIES = {"llava": LlavaConfig, "qwen2_vl": QwenVLConfig, "qwen2_5_vl": QwenVLConfig}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A saved config (``to_dict``) back as its family's dataclass."""
    family = d.get("family", "llava")
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}")
    return FAMILIES[family].from_dict(d)
