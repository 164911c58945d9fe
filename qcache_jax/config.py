"""Model configuration as frozen dataclasses, read from a Hugging Face LLaVA config.

The converter turns a ``transformers`` config (which fills in the family defaults that a Hub
``config.json`` leaves out) into these explicit dataclasses once; everything downstream reads
only these, so a saved checkpoint is self-describing and needs no transformers config to run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .errors import QCacheError

SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_VISION_TYPES = ("clip_vision_model",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")


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
    """A LLaVA model: vision tower, projector and text decoder."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    image_seq_length: int
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    dtype: str = "float32"

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Vision feature layers as indices into CLIP's ``hidden_states`` (0 = embeddings)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_layers + 1
        return tuple(i % n for i in layers)

    @property
    def image_tokens_per_image(self) -> int:
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
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(int(i) for i in x)
    return (int(x),)


def _check_act(name: str, where: str) -> str:
    if name not in SUPPORTED_ACTIVATIONS:
        raise QCacheError(f"unsupported activation {name!r} for {where}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
    return name


def _rope_from_hf(tc) -> RopeConfig:
    params = dict(getattr(tc, "rope_parameters", None) or {})
    # transformers < 5 configs keep the scaling in `rope_scaling` and the base in `rope_theta`.
    legacy = dict(getattr(tc, "rope_scaling", None) or {})
    for k, v in legacy.items():
        params.setdefault(k, v)
    theta = params.get("rope_theta", getattr(tc, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise QCacheError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise QCacheError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta if theta is not None else 10000.0),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", getattr(tc, "max_position_embeddings", 8192))
        ),
    )


def from_hf_config(hf, dtype: str = "float32") -> LlavaConfig:
    """Build a :class:`LlavaConfig` from a ``transformers`` ``LlavaConfig`` object.

    Raises :class:`QCacheError` naming the unsupported field for anything this project does not
    implement, rather than converting a model that would then compute something else.
    """
    model_type = getattr(hf, "model_type", None)
    if model_type != "llava":
        raise QCacheError(f"unsupported model_type {model_type!r}: only 'llava' checkpoints are supported")
    vc, tc = hf.vision_config, hf.text_config
    if vc.model_type not in SUPPORTED_VISION_TYPES:
        raise QCacheError(f"unsupported vision tower {vc.model_type!r}; supported: {', '.join(SUPPORTED_VISION_TYPES)}")
    if tc.model_type not in SUPPORTED_TEXT_TYPES:
        raise QCacheError(
            f"unsupported text model_type {tc.model_type!r}; supported: {', '.join(SUPPORTED_TEXT_TYPES)}"
        )
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise QCacheError(f"unsupported vision_feature_select_strategy {strategy!r}")
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    attention_bias = bool(getattr(tc, "attention_bias", False))
    # Qwen2 has biases on q/k/v but not on o_proj; Llama's attention_bias covers all four.
    qkv_bias = True if tc.model_type == "qwen2" else attention_bias
    o_bias = attention_bias if tc.model_type == "llama" else False
    tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    vfl = hf.vision_feature_layer
    text = TextConfig(
        vocab_size=int(tc.vocab_size),
        hidden_size=int(tc.hidden_size),
        intermediate_size=int(tc.intermediate_size),
        num_layers=int(tc.num_hidden_layers),
        num_heads=int(tc.num_attention_heads),
        num_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(tc.rms_norm_eps),
        rope=_rope_from_hf(tc),
        max_position_embeddings=int(getattr(tc, "max_position_embeddings", 4096)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        hidden_act=_check_act(tc.hidden_act, "the text MLP"),
        tie_word_embeddings=tie,
        model_type=tc.model_type,
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=_as_tuple(getattr(tc, "eos_token_id", None)),
        pad_token_id=getattr(tc, "pad_token_id", None),
    )
    vision = VisionConfig(
        hidden_size=int(vc.hidden_size),
        intermediate_size=int(vc.intermediate_size),
        num_layers=int(vc.num_hidden_layers),
        num_heads=int(vc.num_attention_heads),
        image_size=int(vc.image_size),
        patch_size=int(vc.patch_size),
        num_channels=int(getattr(vc, "num_channels", 3)),
        layer_norm_eps=float(vc.layer_norm_eps),
        hidden_act=_check_act(vc.hidden_act, "the vision MLP"),
    )
    image_token_id = int(hf.image_token_index if hasattr(hf, "image_token_index") else hf.image_token_id)
    if not 0 <= image_token_id < text.vocab_size:
        raise QCacheError(f"image_token_index {image_token_id} is outside the vocabulary (size {text.vocab_size})")
    cfg = LlavaConfig(
        vision=vision,
        text=text,
        image_token_id=image_token_id,
        image_seq_length=int(getattr(hf, "image_seq_length", vision.num_patches)),
        projector_hidden_act=_check_act(hf.projector_hidden_act, "the projector"),
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=vfl if isinstance(vfl, int) else tuple(int(i) for i in vfl),
        vision_feature_select_strategy=strategy,
        dtype=dtype,
    )
    for i in (vfl,) if isinstance(vfl, int) else vfl:
        if not -(vision.num_layers + 1) <= i <= vision.num_layers:
            raise QCacheError(f"vision_feature_layer {i} is out of range for {vision.num_layers} vision layers")
    return cfg
