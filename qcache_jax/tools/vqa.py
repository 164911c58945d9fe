"""Visual question answering records shared by training, evaluation and the demo's data sets:
an example, answer normalisation, and the JSONL evaluation format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Example:
    """One question about one image. ``kind``: the question's kind (for per-kind accuracy);
    ``attributes``: what the data set knows about the scene."""

    image: object  # PIL.Image.Image (RGB)
    question: str
    answer: str
    kind: str = ""
    attributes: dict = dataclasses.field(default_factory=dict)


def normalize_answer(text) -> str:
    """Lowercase, collapse whitespace, strip surrounding spaces and trailing punctuation."""
    return " ".join(str(text).lower().replace("?", " ").replace(".", " ").replace("!", " ").split()).strip(" ,")


def write_jsonl(directory: Path, exs: list[Example], *, name: str = "data.jsonl", calibration_name: str | None = None) -> Path:
    """PNG images under ``directory/images/`` and ``directory/name`` with one
    ``{"image", "question", "answer", "kind"}`` object per line (image paths relative to the
    file's folder), the format ``qcache eval`` reads. ``calibration_name``: also a
    ``{"image", "prompt"}`` file for ``qcache calibrate``. Returns the JSONL path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines, calib = [], []
    for i, ex in enumerate(exs):
        rel = f"images/{i:05d}.png"
        ex.image.save(directory / rel)
        lines.append(json.dumps({"image": rel, "question": ex.question, "answer": ex.answer, "kind": ex.kind}))
        calib.append(json.dumps({"image": rel, "prompt": ex.question}))
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    if calibration_name:
        (directory / calibration_name).write_text("\n".join(calib) + "\n")
    return path
