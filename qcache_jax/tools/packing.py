"""Several questions about one image in one row: the packed batches that training, tuning and
teacher-forced evaluation of visual QA run on.

A packed row is the prompt prefix every question about the image shares (the chat template up
to and including the image tokens), then ``slots`` question suffixes (the rest of each prompt
and its answer). Each suffix sits at the positions it has in its own, unpacked sequence and sees
only the prefix and itself (segment ids: 0 for the prefix, k + 1 for slot k; see
:class:`qcache_jax.lazy.attention.SequencePass`), so the logits are those of running every
question separately, while the image's tokens are computed once instead of ``slots`` times.

The language-model head runs only at the scored positions: for each slot, the positions
whose next token is an answer token or the end-of-turn token (``ans_pos`` [R, slots, A],
``ans_tgt``, ``ans_mask``). Teacher-forced exact match (every answer token and the EOS are the
argmax) is what greedy decoding would produce.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..errors import QCacheError


@dataclasses.dataclass(frozen=True)
class Layout:
    """A packed row: ``prefix`` shared tokens, then ``slots`` segments of ``suffix`` tokens;
    ``answer_slots`` scored positions per question (answer tokens + EOS)."""

    prefix: int
    suffix: int
    slots: int
    answer_slots: int

    @property
    def length(self) -> int:
        return self.prefix + self.slots * self.suffix

    def positions(self) -> np.ndarray:
        """[length] position ids: the prefix 0..P-1, every slot P..P+S-1."""
        return np.concatenate(
            [np.arange(self.prefix)] + [self.prefix + np.arange(self.suffix)] * self.slots
        ).astype(np.int32)

    def segments(self) -> np.ndarray:
        """[length] segment ids: 0 for the prefix, k + 1 for slot k."""
        return np.concatenate(
            [np.zeros(self.prefix)] + [np.full(self.suffix, k + 1) for k in range(self.slots)]
        ).astype(np.int32)


class PackedEncoder:
    """Questions (``.question``, ``.answer``) grouped by image -> packed batches, through the
    checkpoint's processor (chat template, image-token expansion): the same token ids as
    :meth:`qcache_jax.QCacheModel.encode` makes for each question alone.

    ``pixels(image_ids)`` returns the preprocessed images [N, C, H, W] of a group list.
    """

    def __init__(self, processor, pixels: Callable[[Sequence], np.ndarray], *, max_answer_tokens: int = 2):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pixels = pixels
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.image_token = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.answer_slots = max_answer_tokens + 1  # answer tokens + EOS
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's token ids (chat template, one image), cached per question."""
        if question not in self._prompts:
            from PIL import Image

            size = self.processor.image_processor.crop_size["height"]
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            enc = self.processor(images=[Image.new("RGB", (size, size))], text=[text], return_tensors="np")
            self._prompts[question] = enc["input_ids"][0].tolist()
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens and the EOS: what is scored."""
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]
            if len(ids) > self.answer_slots:
                raise QCacheError(f"answer {answer!r} has {len(ids) - 1} tokens (at most {self.answer_slots - 1})")
            self._answers[answer] = ids
        return self._answers[answer]

    def prefix_len(self, question: str) -> int:
        """Tokens up to and including the last image token: what every question shares."""
        ids = self.prompt_ids(question)
        return max(i for i, t in enumerate(ids) if t == self.image_token) + 1

    def layout(self, examples: Sequence, slots: int) -> Layout:
        """The layout that fits every example, with ``slots`` questions per row."""
        p = self.prefix_len(examples[0].question)
        suffix = max(len(self.prompt_ids(e.question)) - p + len(self.answer_ids(e.answer)) - 1 for e in examples)
        return Layout(prefix=p, suffix=suffix, slots=slots, answer_slots=self.answer_slots)

    def batch(self, groups: Sequence[tuple[object, Sequence]], lay: Layout) -> dict:
        """One row per (image id, up to ``lay.slots`` questions about it). Missing slots are
        masked out (``slot_valid`` 0). Returns numpy arrays: ``input_ids`` [R, L],
        ``pixel_values``, ``positions`` / ``segments`` [L], ``ans_pos`` / ``ans_tgt`` /
        ``ans_mask`` [R, slots, A], ``slot_valid`` [R, slots]."""
        q, a, p, s = lay.slots, lay.answer_slots, lay.prefix, lay.suffix
        g = len(groups)
        ids = np.full((g, lay.length), self.pad, np.int32)
        pos = np.zeros((g, q, a), np.int32)
        tgt = np.zeros((g, q, a), np.int32)
        mask = np.zeros((g, q, a), np.float32)
        valid = np.zeros((g, q), np.float32)
        for r, (_, exs) in enumerate(groups):
            if len(exs) > q:
                raise QCacheError(f"{len(exs)} questions for {q} slots")
            for k, e in enumerate(exs):
                prompt, ans = self.prompt_ids(e.question), self.answer_ids(e.answer)
                if self.prefix_len(e.question) != p:
                    raise QCacheError(f"question {e.question!r} does not share the layout's prefix of {p} tokens")
                suffix = prompt[p:] + ans[:-1]
                if len(suffix) > s:
                    raise QCacheError(f"question suffix of {len(suffix)} tokens does not fit {s}")
                ids[r, :p] = prompt[:p]
                start = p + k * s
                ids[r, start : start + len(suffix)] = suffix
                n = len(ans)
                first = start + len(prompt) - p - 1  # the position that predicts the first answer token
                pos[r, k, :n] = np.arange(first, first + n)
                pos[r, k, n:] = pos[r, k, n - 1]
                tgt[r, k, :n] = ans
                mask[r, k, :n] = 1.0
                valid[r, k] = 1.0
        return {
            "input_ids": ids,
            "pixel_values": self.pixels([image for image, _ in groups]),
            "positions": lay.positions(),
            "segments": lay.segments(),
            "ans_pos": pos,
            "ans_tgt": tgt,
            "ans_mask": mask,
            "slot_valid": valid,
        }


def group_by_image(examples: Sequence, slots: int, image_of: Callable = lambda e: e.image_id) -> list[tuple]:
    """Every example exactly once, as (image, up to ``slots`` of its questions) groups, in
    image order."""
    by: dict = {}
    for e in examples:
        by.setdefault(image_of(e), []).append(e)
    return [(image, qs[i : i + slots]) for image, qs in sorted(by.items()) for i in range(0, len(qs), slots)]
