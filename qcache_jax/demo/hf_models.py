"""Tiny random Hugging Face LLaVA models, tokenizer and processor, built locally (no downloads).

Used by the test suite and by ``make demo``. Needs torch and transformers (the ``dev`` extra).
"""

from __future__ import annotations

from pathlib import Path

# A LLaVA-1.5 style chat template: one <image> placeholder per image, then the prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WORDS = (
    "USER: ASSISTANT: what is in the image ? a an red green blue yellow circle square triangle left right "
    "top bottom center yes no color shape where there of and , . : describe picture small big one two three"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def tiny_tokenizer():
    """A word-level fast tokenizer: specials, a few words and single characters (never <unk> for ASCII)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in WORDS + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_llava(
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
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
    initializer_range: float = 0.2,
):
    """A random ``LlavaForConditionalGeneration`` (float32, eval mode) seeded by ``seed``."""
    import torch
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    n_vocab = vocab_size or len(tiny_tokenizer())
    text_kwargs = dict(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        # Larger than HF's 0.02 so that attention is far from uniform and layers differ: a lazy
        # layer then visibly changes the output, and tests can tell right from wrong.
        initializer_range=initializer_range,
    )
    if head_dim is not None:
        text_kwargs["head_dim"] = head_dim
    if rope_parameters is not None:
        text_kwargs["rope_parameters"] = dict(rope_parameters)
    if text_model_type == "llama":
        text_kwargs["attention_bias"] = attention_bias
    text_cfg = AutoConfig.for_model(text_model_type, **text_kwargs)
    vision_cfg = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
        initializer_range=initializer_range / 2,
    )
    n_patches = (image_size // patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=SPECIALS.index("<image>") if vocab_size is None else n_vocab - 1,
        image_seq_length=n_patches + (vision_feature_select_strategy == "full"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
        multimodal_projector_bias=multimodal_projector_bias,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    # Random init draws biases and norm weights as 0/1; perturb them so parity tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_processor(model, tokenizer=None):
    """A LlavaProcessor (CLIP image processor + tokenizer + chat template) matching ``model``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vc = model.config.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or tiny_tokenizer(),
        patch_size=vc.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
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
