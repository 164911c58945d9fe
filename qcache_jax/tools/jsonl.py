"""Reading the JSONL data files users give (calibration samples, evaluation sets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import QCacheError


def read_text(path: Path, expected: str) -> str:
    """The file's UTF-8 text; QCacheError naming the file (``expected`` says what it should be)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QCacheError(f"{path}: not a text file (expected {expected})") from None
    except OSError as e:
        raise QCacheError(f"{path}: cannot read ({e.strerror})") from None


def json_lines(path: Path, text: str) -> Iterator[tuple[str, object]]:
    """(``"file:line"``, parsed object) for every non-blank line; a bad line is a QCacheError."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise QCacheError(f"{where}: not valid JSON ({e.msg})") from None
