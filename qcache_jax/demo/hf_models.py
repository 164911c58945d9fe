"""Tiny random Hugging Face LLaVA models with tokenizer and processor, built locally (no
downloads), for the tests and ``make demo``. Needs torch and transformers (the ``dev`` extra).
The transformers config comes from :func:`qcache_jax.io.hf_config.to_hf_config`, the one
builder of HF configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from ..io.hf_config import from_hf_config, to_hf_config
from .tokenizer import SPECIALS, llava_processor, word_tokenizer

WORDS = (
    "USER: ASSISTANT: what is in the image ? a an red green blue yellow circle square triangle left right "
    "top bottom center yes no color shape where there of and , . : describe picture small big one two three"
).split()


def tiny_tokenizer():
    """A word-level tokenizer: specials, a few words and single characters (never <unk> for ASCII)."""
    return word_tokenizer(WORDS + [chr(c) for c in range(33, 127)])


def tiny_config(
    *,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope: RopeConfig = RopeConfig(),
    text_model_type: str = "llama",
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    vision_feature_layer=-2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    multimodal_projector_bias: bool = True,
    attention_bias: bool = False,
    max_position_embeddings: int = 512,
    rms_norm_eps: float = 1e-6,
    image_token_id: int | None = None,
    image_grid_pinpoints=None,
) -> LlavaConfig:
    """Our config of a tiny LLaVA (ids: <s> 1, </s> 2, <pad> 3; the image token ``<image>`` is 4,
    or the last id when only ``vocab_size`` is given). ``image_grid_pinpoints`` ([[h, w], ...]
    in pixels, multiples of ``image_size``): a LLaVA-NeXT (anyres) model instead of LLaVA-1.5."""
    n_vocab = vocab_size or len(tiny_tokenizer())
    if image_token_id is None:
        image_token_id = SPECIALS.index("<image>") if vocab_size is None else n_vocab - 1
    text = TextConfig(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        rms_norm_eps=rms_norm_eps,
        rope=rope,
        max_position_embeddings=max_position_embeddings,
        qkv_bias=attention_bias or text_model_type == "qwen2",
        o_bias=attention_bias and text_model_type == "llama",
        tie_word_embeddings=tie_word_embeddings,
        model_type=text_model_type,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=3,
    )
    vision = VisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_layers=vision_layers,
        num_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    n_patches = vision.num_patches
    vfl = vision_feature_layer if isinstance(vision_feature_layer, int) else tuple(vision_feature_layer)
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_id=image_token_id,
        image_seq_length=n_patches + (vision_feature_select_strategy == "full"),
        projector_hidden_act=projector_hidden_act,
        projector_bias=multimodal_projector_bias,
        vision_feature_layer=vfl,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_grid_pinpoints=None if image_grid_pinpoints is None else tuple(tuple(p) for p in image_grid_pinpoints),
    )


def tiny_next_config(*, image_grid_pinpoints=((28, 56), (56, 28), (56, 56), (84, 28), (28, 84)), **kwargs):
    """:func:`tiny_config` of a tiny LLaVA-NeXT: by default CLIP at 28 px in 7 px patches (16
    tokens per view) and LLaVA-v1.6's pinpoints scaled from 336 to 28 px (up to 4 tiles)."""
    return tiny_config(image_grid_pinpoints=image_grid_pinpoints, **kwargs)


def random_hf_model(cfg: LlavaConfig, *, seed: int = 0, initializer_range: float = 0.02, perturb: bool = False):
    """A random transformers model (``LlavaForConditionalGeneration``,
    ``LlavaNextForConditionalGeneration`` for an anyres config, or a ``*ForCausalLM`` for a
    text-only config) for ``cfg``, float32, eval mode, seeded. ``perturb``: also draw the
    biases and norm weights (which transformers initialises as 0/1) so parity tests see them."""
    import torch
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = to_hf_config(
        cfg,
        text_extra={"initializer_range": initializer_range},
        vision_extra={"initializer_range": initializer_range / 2},
    )
    if cfg.vision is None:
        model = AutoModelForCausalLM.from_config(hf_cfg).eval()
    elif cfg.anyres:
        model = LlavaNextForConditionalGeneration(hf_cfg).eval()
    else:
        model = LlavaForConditionalGeneration(hf_cfg).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def build_hf_llava(*, seed: int = 0, initializer_range: float = 0.2, rope_parameters: dict | None = None, **kwargs):
    """A random tiny ``LlavaForConditionalGeneration`` (float32, eval) seeded by ``seed``;
    ``kwargs`` are :func:`tiny_config`'s.

    ``initializer_range`` is larger than HF's 0.02 so that attention is far from uniform and
    layers differ: a lazy layer then visibly changes the output, and tests can tell right from
    wrong. Biases and norm weights are perturbed so parity tests see them."""
    if rope_parameters is not None:
        kwargs["rope"] = _rope(rope_parameters)
    cfg = tiny_config(**kwargs)
    return random_hf_model(cfg, seed=seed, initializer_range=initializer_range, perturb=True)


def _rope(params: dict) -> RopeConfig:
    p = dict(params)
    rope_type = p.pop("rope_type", "default")
    base = RopeConfig(theta=float(p.pop("rope_theta", 10000.0)), rope_type=rope_type)
    return dataclasses.replace(base, **{k: v for k, v in p.items() if k in {f.name for f in dataclasses.fields(RopeConfig)}})


def build_hf_llava_next(*, seed: int = 0, initializer_range: float = 0.2, rope_parameters: dict | None = None,
                        **kwargs):
    """A random tiny ``LlavaNextForConditionalGeneration`` like :func:`build_hf_llava` (``kwargs``:
    :func:`tiny_next_config`'s, e.g. ``image_grid_pinpoints``, ``image_size``, ``patch_size``)."""
    if rope_parameters is not None:
        kwargs["rope"] = _rope(rope_parameters)
    cfg = tiny_next_config(**kwargs)
    return random_hf_model(cfg, seed=seed, initializer_range=initializer_range, perturb=True)


def next_processor(tokenizer, cfg: LlavaConfig):
    """A ``LlavaNextProcessor`` for ``cfg`` (an anyres config): HF's LLaVA-NeXT image processor
    (base view resized to the CLIP size, tiles of the best pinpoint grid, CLIP normalisation;
    the PIL backend, which needs no torchvision) + ``tokenizer`` + its chat template."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = cfg.vision.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def tiny_processor(model, tokenizer=None):
    """A LlavaProcessor (CLIP image processor + tokenizer + chat template) matching ``model``
    (a LlavaNextProcessor for a LLaVA-NeXT model)."""
    cfg = from_hf_config(model.config)
    if cfg.anyres:
        return next_processor(tokenizer or tiny_tokenizer(), cfg)
    return llava_processor(
        tokenizer or tiny_tokenizer(),
        image_size=cfg.vision.image_size,
        patch_size=cfg.vision.patch_size,
        strategy=cfg.vision_feature_select_strategy,
    )


def tiny_tokenizer_and_processor(model):
    tok = tiny_tokenizer()
    return tok, tiny_processor(model, tok)


def save_hf(model, directory: Path, *, with_processor: bool = False, **save_kwargs) -> Path:
    """``save_pretrained`` the model (and optionally its tokenizer and processor) into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(str(directory), **save_kwargs)
    if with_processor:
        tok, proc = tiny_tokenizer_and_processor(model)
        proc.save_pretrained(str(directory))
        tok.save_pretrained(str(directory))
    return directory
