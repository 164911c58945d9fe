"""``transformers`` configs <-> :class:`~qcache_jax.config.LlavaConfig`, both directions.

:func:`from_hf_config` reads a transformers ``LlavaConfig`` or ``LlavaNextConfig`` (or a
text-only Llama / Mistral / Qwen2 config) and refuses, naming the field, anything this project does not implement rather
than converting a model that would then compute something else. :func:`to_hf_config` is the
one builder of transformers configs: export, the tests' tiny models, the benchmarks' Hugging
Face peers and the demo models all go through it.
"""

from __future__ import annotations

from ..config import LlavaConfig, QwenVisionConfig, QwenVLConfig, RopeConfig, TextConfig, VisionConfig
from ..errors import QCacheError

SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2")
# The decoders inside Qwen2-VL / Qwen2.5-VL: Qwen2 layers (q/k/v biases) with M-RoPE.
QWEN_VL_TEXT_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
SUPPORTED_VISION_TYPES = ("clip_vision_model",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")


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
    section = tuple(int(i) for i in params.get("mrope_section") or ())
    if rope_type == "mrope":  # transformers < 4.5x named Qwen2-VL's rope this way; its frequencies are default
        rope_type = "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise QCacheError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise QCacheError("partial_rotary_factor != 1 is not supported")
    if rope_type != "llama3":  # the scaling fields mean nothing to the other kinds: keep the defaults
        return RopeConfig(theta=float(theta if theta is not None else 10000.0), rope_type=rope_type,
                          factor=float(params.get("factor", 1.0)), mrope_section=section)
    if section:
        raise QCacheError("mrope_section with llama3 rope scaling is not supported")
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


def text_config_from_hf(tc, *, tie_word_embeddings: bool | None = None) -> TextConfig:
    """The decoder's :class:`TextConfig` from a transformers Llama / Mistral / Qwen2 config."""
    if tc.model_type not in SUPPORTED_TEXT_TYPES + QWEN_VL_TEXT_TYPES:
        raise QCacheError(
            f"unsupported text model_type {tc.model_type!r}; supported: "
            f"{', '.join(SUPPORTED_TEXT_TYPES + QWEN_VL_TEXT_TYPES)}"
        )
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    attention_bias = bool(getattr(tc, "attention_bias", False))
    tie = bool(getattr(tc, "tie_word_embeddings", False)) if tie_word_embeddings is None else tie_word_embeddings
    return TextConfig(
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
        # Qwen2 has biases on q/k/v but not on o_proj; Llama's attention_bias covers all four.
        qkv_bias=True if tc.model_type in ("qwen2",) + QWEN_VL_TEXT_TYPES else attention_bias,
        o_bias=attention_bias if tc.model_type == "llama" else False,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        hidden_act=_check_act(tc.hidden_act, "the text MLP"),
        tie_word_embeddings=tie,
        model_type=tc.model_type,
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=_as_tuple(getattr(tc, "eos_token_id", None)),
        pad_token_id=getattr(tc, "pad_token_id", None),
    )


def from_hf_config(hf, dtype: str = "float32") -> LlavaConfig:
    """A :class:`LlavaConfig` from a transformers ``LlavaConfig`` / ``LlavaNextConfig``, or from a
    Llama / Mistral / Qwen2 text config (a text-only model: no vision tower, no image tokens)."""
    model_type = getattr(hf, "model_type", None)
    if model_type in QWEN_VL_TYPES:
        return qwen_config_from_hf(hf, dtype)
    if model_type in SUPPORTED_TEXT_TYPES:
        return LlavaConfig(vision=None, text=text_config_from_hf(hf), image_token_id=None, image_seq_length=0, dtype=dtype)
    if model_type not in ("llava", "llava_next"):
        raise QCacheError(
            f"unsupported model_type {model_type!r}: supported are 'llava', 'llava_next', 'qwen2_vl', 'qwen2_5_vl' and "
            f"text-only {', '.join(SUPPORTED_TEXT_TYPES)}"
        )
    vc, tc = hf.vision_config, hf.text_config
    if vc.model_type not in SUPPORTED_VISION_TYPES:
        raise QCacheError(f"unsupported vision tower {vc.model_type!r}; supported: {', '.join(SUPPORTED_VISION_TYPES)}")
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise QCacheError(f"unsupported vision_feature_select_strategy {strategy!r}")
    tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    text = text_config_from_hf(tc, tie_word_embeddings=tie)
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
    vfl = hf.vision_feature_layer
    for i in (vfl,) if isinstance(vfl, int) else vfl:
        if not -(vision.num_layers + 1) <= i <= vision.num_layers:
            raise QCacheError(f"vision_feature_layer {i} is out of range for {vision.num_layers} vision layers")
    pinpoints = _pinpoints(hf.image_grid_pinpoints, vision.image_size) if model_type == "llava_next" else None
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=int(getattr(hf, "image_seq_length", vision.num_patches)),
        projector_hidden_act=_check_act(hf.projector_hidden_act, "the projector"),
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=vfl if isinstance(vfl, int) else tuple(int(i) for i in vfl),
        vision_feature_select_strategy=strategy,
        dtype=dtype,
    )


def _int_size(x, what: str) -> int:
    """HF types patch sizes as ``int | list[int]``; every released checkpoint uses one int."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise QCacheError(f"non-square {what} {tuple(x)} is not supported")
        x = x[0]
    return int(x)


def vision_config_from_hf(vc, variant: str) -> QwenVisionConfig:
    """Our :class:`QwenVisionConfig` from a transformers ``Qwen2VLVisionConfig`` (``variant``
    ``qwen2_vl``) or ``Qwen2_5_VLVisionConfig`` (``qwen2_5_vl``).

    The two HF configs name the same things differently: Qwen2-VL's tower width is
    ``embed_dim`` and its ``hidden_size`` is the merger's output (the text width), with the MLP
    width given as ``mlp_ratio``; Qwen2.5-VL's tower width is ``hidden_size`` and the merger's
    output ``out_hidden_size``, with an explicit ``intermediate_size``.
    """
    if variant not in QWEN_VL_TYPES:
        raise QCacheError(f"unknown Qwen vision variant {variant!r}; expected one of {QWEN_VL_TYPES}")
    rope = getattr(vc, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(vc, "rope_theta", 10000.0)))
    common = dict(
        variant=variant,
        depth=int(vc.depth),
        num_heads=int(vc.num_heads),
        patch_size=_int_size(vc.patch_size, "patch_size"),
        temporal_patch_size=_int_size(vc.temporal_patch_size, "temporal_patch_size"),
        spatial_merge_size=int(vc.spatial_merge_size),
        in_channels=int(vc.in_channels),
        hidden_act=_check_act(str(vc.hidden_act), "the vision MLP"),
        rope_theta=theta,
    )
    if variant == "qwen2_vl":
        return QwenVisionConfig(
            embed_dim=int(vc.embed_dim),
            out_hidden_size=int(vc.hidden_size),
            intermediate_size=int(vc.embed_dim * vc.mlp_ratio),  # HF: int(embed_dim * mlp_ratio)
            **common,
        )
    return QwenVisionConfig(
        embed_dim=int(vc.hidden_size),
        out_hidden_size=int(vc.out_hidden_size),
        intermediate_size=int(vc.intermediate_size),
        window_size=int(vc.window_size),
        fullatt_block_indexes=tuple(int(i) for i in vc.fullatt_block_indexes),
        **common,
    )


def qwen_config_from_hf(hf, dtype: str = "float32") -> QwenVLConfig:
    """A :class:`QwenVLConfig` from a transformers ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``."""
    tc = hf.text_config
    if getattr(tc, "use_sliding_window", False):
        raise QCacheError("Qwen2-VL with use_sliding_window=true is not supported (sliding-window attention)")
    tie = bool(getattr(hf, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    text = text_config_from_hf(tc, tie_word_embeddings=tie)
    half = text.head_dim // 2
    if sum(text.rope.mrope_section) != half:
        raise QCacheError(
            f"mrope_section {text.rope.mrope_section} must sum to head_dim // 2 = {half} (the rotary pairs)"
        )
    ids = {}
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        v = getattr(hf, name, None)
        if v is not None and not 0 <= int(v) < text.vocab_size:
            raise QCacheError(f"{name} {v} is outside the vocabulary (size {text.vocab_size})")
        ids[name] = None if v is None else int(v)
    if ids["image_token_id"] is None:
        raise QCacheError("the Qwen2-VL config has no image_token_id")
    return QwenVLConfig(family=hf.model_type, vision=vision_config_from_hf(hf.vision_config, hf.model_type),
                        text=text, dtype=dtype, **ids)


def _pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` as a tuple of (height, width), checked: each a
    positive multiple of the vision ``image_size`` (as transformers' tile grid needs)."""
    try:
        out = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise QCacheError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {pinpoints!r}") from None
    bad = [p for p in out if min(p) < tile or p[0] % tile or p[1] % tile]
    if not out or bad:
        raise QCacheError(
            f"image_grid_pinpoints {[list(p) for p in bad] or '[]'}: every pinpoint must be a multiple of the vision "
            f"image_size {tile} (whole tiles)"
        )
    return out


def _text_fields(t: TextConfig) -> dict:
    """The transformers text-config fields every decoder family writes alike (not the head
    dimension, which Qwen2-VL's config derives, nor the rope parameters)."""
    eos = list(t.eos_token_id) if len(t.eos_token_id) > 1 else (t.eos_token_id[0] if t.eos_token_id else None)
    return dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=eos,
        pad_token_id=t.pad_token_id,
    )


def to_hf_text_config(t: TextConfig, **extra):
    """A transformers Llama / Mistral / Qwen2 config describing ``t`` (``extra``: HF-only fields
    such as ``initializer_range``)."""
    from transformers import AutoConfig

    rope = {"rope_type": t.rope.rope_type, "rope_theta": t.rope.theta}
    if t.rope.rope_type in ("linear", "llama3"):
        rope["factor"] = t.rope.factor
    if t.rope.rope_type == "llama3":
        rope.update(
            low_freq_factor=t.rope.low_freq_factor,
            high_freq_factor=t.rope.high_freq_factor,
            original_max_position_embeddings=t.rope.original_max_position_embeddings,
        )
    kw = dict(_text_fields(t), head_dim=t.head_dim, rope_parameters=rope)
    if t.model_type == "llama":
        if t.qkv_bias != t.o_bias:
            raise QCacheError("a Llama text model has attention biases on all of q/k/v/o or none")
        kw.update(attention_bias=t.qkv_bias, mlp_bias=t.mlp_bias)
    elif t.qkv_bias != (t.model_type == "qwen2") or t.o_bias or t.mlp_bias:
        raise QCacheError(f"biases of this checkpoint cannot be expressed as a {t.model_type} config")
    kw.update(extra)
    return AutoConfig.for_model(t.model_type, **kw)


def to_hf_qwen_config(cfg: QwenVLConfig, *, text_extra: dict | None = None, vision_extra: dict | None = None):
    """A transformers ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` describing ``cfg``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    t, v = cfg.text, cfg.vision
    if t.rope.rope_type != "default" or t.o_bias or t.mlp_bias or not t.qkv_bias:
        raise QCacheError("this text model cannot be expressed as a Qwen2-VL config (rope scaling or biases)")
    text = dict(_text_fields(t), rope_parameters={"rope_type": "default", "rope_theta": t.rope.theta,
                                                  "mrope_section": list(t.rope.mrope_section)}, **(text_extra or {}))
    vision = dict(depth=v.depth, num_heads=v.num_heads, patch_size=v.patch_size,
                  temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                  in_channels=v.in_channels, hidden_act=v.hidden_act,
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta}, **(vision_extra or {}))
    if cfg.family == "qwen2_vl":
        if v.intermediate_size % v.embed_dim:
            raise QCacheError("a Qwen2-VL vision MLP width must be a whole multiple of its embed_dim (mlp_ratio)")
        vision.update(embed_dim=v.embed_dim, hidden_size=v.out_hidden_size, mlp_ratio=v.intermediate_size // v.embed_dim)
        cls = Qwen2VLConfig
    else:
        vision.update(hidden_size=v.embed_dim, out_hidden_size=v.out_hidden_size, intermediate_size=v.intermediate_size,
                      window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes))
        cls = Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=cfg.image_token_id,
               video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
               vision_end_token_id=cfg.vision_end_token_id, tie_word_embeddings=t.tie_word_embeddings)


def to_hf_config(cfg, *, text_extra: dict | None = None, vision_extra: dict | None = None):
    """A transformers ``LlavaConfig`` (``LlavaNextConfig`` for LLaVA-NeXT; a text config for a
    text-only model; ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` for that family) describing ``cfg``;
    the inverse of :func:`from_hf_config`. ``text_extra`` / ``vision_extra``: HF-only fields
    of the sub-configs (``initializer_range``, ...)."""
    from transformers import CLIPVisionConfig, LlavaConfig as HFLlavaConfig, LlavaNextConfig

    if cfg.family != "llava":
        return to_hf_qwen_config(cfg, text_extra=text_extra, vision_extra=vision_extra)

    text = to_hf_text_config(cfg.text, **(text_extra or {}))
    if cfg.vision is None:
        return text
    v = cfg.vision
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        projection_dim=v.hidden_size,
        **(vision_extra or {}),
    )
    vfl = cfg.vision_feature_layer
    cls, extra = HFLlavaConfig, {}
    if cfg.anyres:
        cls, extra = LlavaNextConfig, {"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints]}
    return cls(
        **extra,
        vision_config=vision,
        text_config=text,
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.image_seq_length,
        vision_feature_layer=vfl if isinstance(vfl, int) else list(vfl),
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
        multimodal_projector_bias=cfg.projector_bias,
        tie_word_embeddings=cfg.text.tie_word_embeddings,
    )
