"""The one builder of the small word-level tokenizers, chat template and LLaVA processors that
the demo's toy models and the tests use (built locally: no download)."""

from __future__ import annotations

from typing import Sequence

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
# Fixed ids: <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4.
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def word_tokenizer(words: Sequence[str], *, lowercase: bool = False, split_punctuation: bool = False):
    """A fast word-level tokenizer: :data:`SPECIALS`, then ``words`` (whitespace-split input;
    ``lowercase`` and ``split_punctuation`` normalise it), with :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    splitters = [pre_tokenizers.WhitespaceSplit()] + ([pre_tokenizers.Punctuation()] if split_punctuation else [])
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def clip_image_processor(image_size: int):
    """A CLIP image processor (resize / centre-crop to ``image_size``, CLIP normalisation).

    transformers 5.25 made ``CLIPImageProcessor`` the torchvision backend and falls back, with a
    warning on every run, to ``CLIPImageProcessorPil`` without torchvision; the PIL class is what
    we use on purpose (the numbers are the same, and it saves as ``CLIPImageProcessor``)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def llava_processor(tokenizer, *, image_size: int, patch_size: int, strategy: str = "default"):
    """A ``LlavaProcessor``: :func:`clip_image_processor` + ``tokenizer`` + the tokenizer's chat
    template."""
    from transformers import LlavaProcessor

    image_processor = clip_image_processor(image_size)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )

