"""A deterministic synthetic visual QA task: one coloured shape on a plain background.

Every example is a pure function of ``(seed, index)``: an RGB image (rendered at 4x and
downsampled, so edges are anti-aliased and positions/sizes are continuous), a question and a
one-word answer. Four question kinds, balanced by index (``index % 4``):

* ``color``: "what color is the shape ?" -> red | green | blue | yellow | purple
* ``shape``: "what shape is it ?" -> circle | square | triangle
* ``where``: "where is the shape ?" -> left | right | top | bottom | center
* ``yesno``: "is the shape red ?" / "is it a circle ?" -> yes | no (half of them yes)

Splits are different seeds (``SPLITS``: train 0, validation 1, test 2). The tokenizer is word
level (lowercased, punctuation split off) with a LLaVA-1.5 chat template, saved in Hugging Face
format together with a ``LlavaProcessor`` (CLIP image processor), so a checkpoint trained on
this task works with ``qcache generate --image``; :func:`qcache_jax.tools.vqa.write_jsonl`
writes an evaluation set that ``qcache eval`` reads.
"""

from __future__ import annotations

import numpy as np

from ..tools.vqa import Example
from .tokenizer import llava_processor, word_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
# Shape centres as fractions of the image side (x, y).
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
KINDS = ("color", "shape", "where", "yesno")
SPLITS = {"train": 0, "validation": 1, "test": 2}
BACKGROUND = (235, 235, 235)
IMAGE_SIZE = 64
PATCH_SIZE = 16

WORDS = (
    "user assistant : ? . , what color colour is the shape it a an where yes no which in image picture "
    "there of this"
).split() + list(COLORS) + list(SHAPES) + list(POSITIONS)


def render(color: str, shape: str, position: str, *, size: float, jitter: tuple[float, float], image_size: int = IMAGE_SIZE):
    """A PIL image of one ``shape`` of ``color`` near ``position``; ``size`` is the half-extent
    as a fraction of the image side, ``jitter`` the centre offset (fractions of the side)."""
    from PIL import Image, ImageDraw

    ss = 4  # supersampling factor
    n = image_size * ss
    img = Image.new("RGB", (n, n), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx = (POSITIONS[position][0] + jitter[0]) * n
    cy = (POSITIONS[position][1] + jitter[1]) * n
    r = size * n
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.9 * r  # a square of the same visual weight as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def example(seed: int, index: int, *, image_size: int = IMAGE_SIZE) -> Example:
    """The ``index``-th example of the stream ``seed`` (a pure function of both)."""
    rng = np.random.default_rng([int(seed), int(index)])
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    position = str(rng.choice(list(POSITIONS)))
    size = float(rng.uniform(0.17, 0.22))
    jitter = tuple(float(v) for v in rng.uniform(-0.02, 0.02, 2))
    image = render(color, shape, position, size=size, jitter=jitter, image_size=image_size)
    kind = KINDS[index % len(KINDS)]
    if kind == "color":
        question, answer = "what color is the shape ?", color
    elif kind == "shape":
        question, answer = "what shape is it ?", shape
    elif kind == "where":
        question, answer = "where is the shape ?", position
    else:
        yes = (index // len(KINDS)) % 2 == 0
        if rng.random() < 0.5:
            asked = color if yes else str(rng.choice([c for c in COLORS if c != color]))
            question = f"is the shape {asked} ?"
        else:
            asked = shape if yes else str(rng.choice([s for s in SHAPES if s != shape]))
            question = f"is it a {asked} ?"
        answer = "yes" if yes else "no"
    return Example(image, question, answer, kind, {"color": color, "shape": shape, "position": position})


def examples(seed: int, start: int, count: int, **kw) -> list[Example]:
    return [example(seed, i, **kw) for i in range(start, start + count)]


def split(name: str, count: int, *, base_seed: int = 0, **kw) -> list[Example]:
    """The first ``count`` examples of split ``name`` (train / validation / test)."""
    return examples(base_seed * 100 + SPLITS[name], 0, count, **kw)


# -- tokenizer and processor -------------------------------------------------------------------


def build_tokenizer():
    """Word-level tokenizer (lowercased, punctuation split off) with the chat template."""
    return word_tokenizer(WORDS, lowercase=True, split_punctuation=True)


def build_processor(tokenizer=None, *, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """A ``LlavaProcessor`` for this task's images and tokenizer."""
    return llava_processor(tokenizer or build_tokenizer(), image_size=image_size, patch_size=patch_size)
