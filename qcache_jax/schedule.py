"""The lazy schedule: which decoder layers inherit their anchor's attention.

A schedule is a tuple of L booleans. Layer 0 is never lazy. A lazy layer's anchor ``a(l)`` is
the nearest non-lazy layer at or below it; :func:`anchors` is the one place that derives it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from .errors import QCacheError

SCHEDULE_FILE = "schedule.json"

Schedule = tuple  # tuple[bool, ...] of length L


def anchors(lazy: Sequence[bool]) -> tuple[int, ...]:
    """Anchor index a(l) for every layer: l itself when not lazy, else the nearest non-lazy below."""
    out, current = [], 0
    for i, flag in enumerate(lazy):
        if not flag:
            current = i
        out.append(current)
    return tuple(out)


def validate(lazy: Sequence[bool], num_layers: int) -> Schedule:
    lazy = tuple(bool(x) for x in lazy)
    if len(lazy) != num_layers:
        raise QCacheError(f"lazy schedule has {len(lazy)} entries, the model has {num_layers} layers")
    if num_layers and lazy[0]:
        raise QCacheError("layer 0 cannot be lazy: it has no anchor below it")
    return lazy


def from_layers(layers: Sequence[int], num_layers: int) -> Schedule:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise QCacheError(f"lazy layer index {bad[0]} is out of range (the model has layers 0-{num_layers - 1})")
    chosen = set(layers)
    return validate([i in chosen for i in range(num_layers)], num_layers)


def parse_ranges(spec: str, num_layers: int) -> Schedule:
    """``"3-7,10,12-15"`` (0-based, inclusive) -> schedule."""
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise QCacheError(f"bad lazy layer spec {spec!r}: {part!r} is not N or N-M")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise QCacheError(f"bad lazy layer range {part!r}: end before start")
        layers.extend(range(lo, hi + 1))
    return from_layers(layers, num_layers)


def load_schedule_file(path: Path, num_layers: int) -> tuple[Schedule, str | None]:
    """(schedule, mode or None) from a schedule JSON with ``lazy_layers`` (and optionally ``mode``)."""
    try:
        data = json.loads(Path(path).read_text())
        layers = data["lazy_layers"]
    except FileNotFoundError:
        raise QCacheError(f"{path}: schedule file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise QCacheError(f"{path}: not a schedule JSON with a 'lazy_layers' list ({e})") from None
    if data.get("num_layers") not in (None, num_layers):
        raise QCacheError(f"{path}: schedule is for {data['num_layers']} layers, the model has {num_layers}")
    return from_layers([int(i) for i in layers], num_layers), data.get("mode")


def resolve(spec, num_layers: int, ckpt_dir: Path | None = None) -> Schedule:
    """Any accepted form -> schedule: None/``none`` (dense), ``auto`` (the checkpoint's
    schedule.json), ``"3-7,10"``, a schedule JSON path, or a boolean sequence of length L."""
    return resolve_with_mode(spec, num_layers, ckpt_dir)[0]


def resolve_with_mode(spec, num_layers: int, ckpt_dir: Path | None = None) -> tuple[Schedule, str | None]:
    """:func:`resolve`, plus the mode a schedule file records (None for the other forms)."""
    if spec is None:
        return (False,) * num_layers, None
    if isinstance(spec, str):
        s = spec.strip()
        if s.lower() in ("none", "dense", ""):
            return (False,) * num_layers, None
        if s.lower() == "auto":
            if ckpt_dir is None or not (Path(ckpt_dir) / SCHEDULE_FILE).is_file():
                raise QCacheError(
                    f"--lazy auto: no {SCHEDULE_FILE} in the checkpoint; run `qcache calibrate` or give layers like 3-7,10"
                )
            return load_schedule_file(Path(ckpt_dir) / SCHEDULE_FILE, num_layers)
        if s.endswith(".json") or Path(s).is_file():
            return load_schedule_file(Path(s), num_layers)
        return parse_ranges(s, num_layers), None
    return validate(list(spec), num_layers), None


def describe(lazy: Schedule) -> str:
    """Compact ranges, e.g. ``"3-7,10"`` (``"none"`` when dense)."""
    idx = [i for i, f in enumerate(lazy) if f]
    if not idx:
        return "none"
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)
