"""easy-VQA (the ``easy-vqa`` PyPI package, MIT): a real visual QA data set, shipped offline.

4,000 train / 1,000 test 64x64 RGB images of one coloured shape each, with 38,575 / 9,673
questions and 13 single-word answers: yes / no (74 %), a colour (teal black green blue gray
yellow red brown) or a shape (circle rectangle triangle). The questions about one image
are answered from its pixels, but 74 % are yes/no and answering each question text with its
most common answer already scores about 0.67: :func:`question_only_baseline` measures it, and
:func:`accuracy_report` gives the colour and shape questions apart.

Train is split by image into a training part and a held-out validation part
(:func:`holdout`: images >= 3800), so validation, like test, is on unseen images.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import QCacheError

COLORS = ("teal", "black", "green", "blue", "gray", "yellow", "red", "brown")
SHAPES = ("circle", "rectangle", "triangle")
KINDS = ("yesno", "color", "shape")
VAL_FIRST_IMAGE = 3800  # train images from this id on are the held-out validation images


@dataclasses.dataclass(frozen=True)
class QA:
    """One easy-VQA question: its text, answer, image id and kind (from the answer)."""

    question: str
    answer: str
    image_id: int
    kind: str


def answer_kind(answer: str) -> str:
    """``yesno``, ``color`` or ``shape``: the kind of question an easy-VQA answer belongs to."""
    if answer in ("yes", "no"):
        return "yesno"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise QCacheError(f"unknown easy-VQA answer {answer!r}")


def _package():
    if importlib.util.find_spec("easy_vqa") is None:
        raise QCacheError("the easy-VQA data set is not installed: pip install easy-vqa")
    import easy_vqa

    return easy_vqa


def load_split(split: str) -> list[QA]:
    """Every question of easy-VQA's ``train`` or ``test`` split, in the package's order."""
    pkg = _package()
    texts, answers, ids = {"train": pkg.get_train_questions, "test": pkg.get_test_questions}[split]()
    return [QA(q, a, int(i), answer_kind(a)) for q, a, i in zip(texts, answers, ids)]


def image_paths(split: str) -> dict[int, str]:
    """Image id -> PNG path of a split."""
    pkg = _package()
    return {"train": pkg.get_train_image_paths, "test": pkg.get_test_image_paths}[split]()


def holdout(train: Sequence[QA], first_val_image: int = VAL_FIRST_IMAGE) -> tuple[list[QA], list[QA]]:
    """(training part, validation part) of TRAIN, split by image id."""
    return [e for e in train if e.image_id < first_val_image], [e for e in train if e.image_id >= first_val_image]


def subsample(exs: Sequence[QA], n: int, seed: int = 0) -> list[QA]:
    """A fixed random subset of ``n`` examples in their original order (all when n >= len)."""
    if n >= len(exs):
        return list(exs)
    idx = np.sort(np.random.default_rng(seed).permutation(len(exs))[:n])
    return [exs[i] for i in idx]


def accuracy_report(exs: Sequence[QA], hits: Sequence[bool]) -> dict:
    """{"all", "n", "<kind>", "n_<kind>", "color+shape"}: accuracy overall and per kind."""
    hits = np.asarray(hits, bool)
    out = {"all": float(hits.mean()) if len(hits) else float("nan"), "n": int(len(hits))}
    kinds = np.array([e.kind for e in exs])
    for k in KINDS:
        sel = kinds == k
        out[k] = float(hits[sel].mean()) if sel.any() else float("nan")
        out[f"n_{k}"] = int(sel.sum())
    sel = kinds != "yesno"
    out["color+shape"] = float(hits[sel].mean()) if sel.any() else float("nan")
    return out


def question_only_baseline(train: Sequence[QA], evaluate: Sequence[QA]) -> dict:
    """Accuracy of answering each question text with its most common answer in ``train``
    (an unseen question gets the overall most common answer): what needs no image."""
    by_q: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in train:
        by_q[e.question][e.answer] += 1
    overall = collections.Counter(e.answer for e in train).most_common(1)[0][0]
    guess = {q: c.most_common(1)[0][0] for q, c in by_q.items()}
    return accuracy_report(evaluate, [guess.get(e.question, overall) == e.answer for e in evaluate])


class Pixels:
    """CLIP-preprocessed images of a split, by image id, computed once (cached as ``.npy`` in
    ``cache_dir`` when given: preprocessing 4,000 images takes a while)."""

    def __init__(self, image_processor, split: str, cache_dir: Path | None = None):
        self.ip, self.split, self.cache_dir = image_processor, split, cache_dir
        self._arr = None

    def all(self) -> np.ndarray:
        if self._arr is None:
            paths = image_paths(self.split)
            key = hashlib.sha1(repr((self.split, len(paths), self.ip.to_json_string())).encode()).hexdigest()[:12]
            cached = Path(self.cache_dir) / f"pixels-{self.split}-{key}.npy" if self.cache_dir else None
            if cached is not None and cached.is_file():
                self._arr = np.load(cached)
            else:
                self._arr = self._compute(paths)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cached.with_suffix(".tmp.npy")
                    np.save(tmp, self._arr)
                    tmp.rename(cached)
        return self._arr

    def _compute(self, paths: dict[int, str]) -> np.ndarray:
        from PIL import Image

        n = max(paths) + 1
        arr = None
        for start in range(0, n, 500):
            ims = [Image.open(paths[i]).convert("RGB") for i in range(start, min(n, start + 500))]
            pv = self.ip(ims, return_tensors="np")["pixel_values"].astype(np.float32)
            if arr is None:
                arr = np.empty((n, *pv.shape[1:]), np.float32)
            arr[start : start + len(ims)] = pv
        return arr

    def __call__(self, image_ids: Sequence[int]) -> np.ndarray:
        return self.all()[np.asarray(list(image_ids), int)]


class TrainStream:
    """step -> that step's (image id, questions) groups: ``images`` images per step (a fresh
    permutation of the training images each epoch), each with ``slots`` of its questions (in a
    fixed per-image random order, the next ``slots`` on each visit). A pure function of
    (seed, step): a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, exs: Sequence[QA], images: int, slots: int, seed: int):
        self.groups: dict[int, list[QA]] = collections.defaultdict(list)
        for e in exs:
            self.groups[e.image_id].append(e)
        self.ids = np.array(sorted(self.groups))
        self.images, self.slots, self.seed = images, slots, seed
        self.order = {i: np.random.default_rng([seed, 1, int(i)]).permutation(len(q)) for i, q in self.groups.items()}
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.ids)))
        return self._perm[1]

    def __call__(self, step: int) -> list[tuple[int, list[QA]]]:
        out, n = [], len(self.ids)
        for k in range(step * self.images, (step + 1) * self.images):
            epoch, i = divmod(k, n)
            image_id = int(self.ids[self._epoch_perm(epoch)[i]])
            qs, order = self.groups[image_id], self.order[image_id]
            take = list(dict.fromkeys((epoch * self.slots + j) % len(qs) for j in range(self.slots)))
            out.append((image_id, [qs[order[t]] for t in take]))
        return out


def to_examples(exs: Sequence[QA], split: str):
    """The questions as :class:`qcache_jax.tools.vqa.Example` (images opened), e.g. for
    :func:`qcache_jax.tools.vqa.write_jsonl` (the ``qcache eval`` format)."""
    from PIL import Image

    from ..tools.vqa import Example

    paths = image_paths(split)
    return [Example(Image.open(paths[e.image_id]).convert("RGB"), e.question, e.answer, e.kind) for e in exs]


def image_labels(exs: Sequence[QA]) -> dict[int, dict[str, str]]:
    """What the questions reveal about each image: {image id: {"shape": ..., "color": ...}}
    from the colour and shape questions (a colour question naming the shape reveals both)."""
    out: dict[int, dict[str, str]] = collections.defaultdict(dict)
    for e in exs:
        if e.kind in ("color", "shape"):
            out[e.image_id][e.kind] = e.answer
        if e.kind == "color":
            named = [s for s in SHAPES if s in e.question.split()[-1] or f" {s}" in e.question]
            if len(named) == 1:
                out[e.image_id]["shape"] = named[0]
    return dict(out)
