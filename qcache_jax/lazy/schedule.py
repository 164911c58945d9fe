"""The lazy schedule: which decoder layers inherit their anchor's attention, and in which mode.

A :class:`Schedule` is the one place that knows the method's structure (docs/method.md):

* ``lazy``: L booleans; layer 0 is never lazy.
* the **anchor** ``a(l)`` of every layer: ``l`` itself when not lazy, else the nearest non-lazy
  layer below it; a maximal run of lazy layers with its anchor is a **lazy block**;
* which key arrays a layer stores in the KV cache in its ``mode`` (GLA lazy layers none, VLA
  lazy layers the text keys only);
* the SPEC strings users type (``none``, ``auto``, ``3-7,10``, a schedule JSON path), and the
  one JSON format schedules are read from and written to (calibration, tuning, ``--lazy auto``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .._files import write_atomic
from ..errors import QCacheError

MODES = ("vla", "gla")
DEFAULT_MODE = "vla"
# Which VLA formula the code computes (docs/method.md): 2 = every query row scores the visual
# keys with the anchor's Q Cache and keys (revised 2026-12-07); 1 = the first reading (visual
# query rows only). Measurements record it, so results of another formula are not shown as ours.
VLA_FORMULA = 2
SCHEDULE_FILE = "schedule.json"


def check_mode(mode: str) -> str:
    """``mode`` if it is a lazy attention mode, else a QCacheError naming the bad value."""
    if mode not in MODES:
        raise QCacheError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def format_layers(layers: Sequence[int]) -> str:
    """Compact ranges, e.g. ``[2, 4, 5, 6, 7]`` -> ``"2,4-7"`` (``"none"`` when empty)."""
    idx = sorted(layers)
    if not idx:
        return "none"
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An immutable lazy schedule: ``lazy`` (L booleans, layer 0 never lazy) and ``mode``.

    Hashable, so it can be part of a compiled plan's key. A dense schedule has no lazy layer
    (its mode is irrelevant and reported as ``dense``).
    """

    lazy: tuple[bool, ...]
    mode: str = DEFAULT_MODE

    def __post_init__(self):
        object.__setattr__(self, "lazy", tuple(bool(x) for x in self.lazy))
        check_mode(self.mode)
        if self.lazy and self.lazy[0]:
            raise QCacheError("layer 0 cannot be lazy: it has no anchor below it")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def dense(cls, num_layers: int) -> "Schedule":
        return cls((False,) * num_layers)

    @classmethod
    def from_layers(cls, layers: Sequence[int], num_layers: int, mode: str = DEFAULT_MODE) -> "Schedule":
        """The schedule whose lazy layers are ``layers`` (0-based)."""
        bad = [i for i in layers if not 0 <= int(i) < num_layers]
        if bad:
            raise QCacheError(f"lazy layer index {bad[0]} is out of range (the model has layers 0-{num_layers - 1})")
        chosen = {int(i) for i in layers}
        return cls(tuple(i in chosen for i in range(num_layers)), mode)

    @classmethod
    def parse_ranges(cls, spec: str, num_layers: int, mode: str = DEFAULT_MODE) -> "Schedule":
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
        return cls.from_layers(layers, num_layers, mode)

    @classmethod
    def read(cls, path, num_layers: int) -> "Schedule":
        """The schedule saved in a schedule JSON file (``lazy_layers``, ``num_layers``, ``mode``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            layers = [int(i) for i in data["lazy_layers"]]
        except FileNotFoundError:
            raise QCacheError(f"{path}: schedule file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise QCacheError(f"{path}: not a schedule JSON with a 'lazy_layers' list ({type(e).__name__})") from None
        if data.get("num_layers") not in (None, num_layers):
            raise QCacheError(f"{path}: schedule is for {data['num_layers']} layers, the model has {num_layers}")
        mode = data.get("mode", DEFAULT_MODE)
        if mode not in MODES:
            raise QCacheError(f"{path}: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
        return cls.from_layers(layers, num_layers, mode)

    @classmethod
    def resolve(cls, spec, num_layers: int, *, mode: str | None = None, ckpt_dir=None) -> "Schedule":
        """The one resolver of (lazy, mode) for every command and the Python API.

        ``spec``: None / ``none`` / ``dense`` (dense), ``auto`` (``CKPT/schedule.json``),
        ranges such as ``"3-7,10"``, a schedule JSON path, a :class:`Schedule`, or a sequence of
        L booleans. ``mode``: an explicit mode wins; otherwise the mode a schedule file (or a
        given Schedule) records; otherwise ``vla``.
        """
        if mode is not None:
            check_mode(mode)
        if isinstance(spec, Schedule):
            if spec.num_layers != num_layers:
                raise QCacheError(f"lazy schedule has {spec.num_layers} entries, the model has {num_layers} layers")
            return spec if mode is None else dataclasses.replace(spec, mode=mode)
        if spec is None:
            return cls((False,) * num_layers, mode or DEFAULT_MODE)
        if isinstance(spec, (str, Path)):
            s = str(spec).strip()
            if s.lower() in ("none", "dense", ""):
                return cls((False,) * num_layers, mode or DEFAULT_MODE)
            if s.lower() == "auto":
                path = Path(ckpt_dir) / SCHEDULE_FILE if ckpt_dir is not None else None
                if path is None or not path.is_file():
                    raise QCacheError(
                        f"--lazy auto: no {SCHEDULE_FILE} in the checkpoint; run `qcache calibrate` or give layers like 3-7,10"
                    )
                found = cls.read(path, num_layers)
            elif s.endswith(".json") or Path(s).is_file():
                found = cls.read(Path(s), num_layers)
            else:
                return cls.parse_ranges(s, num_layers, mode or DEFAULT_MODE)
            return found if mode is None else dataclasses.replace(found, mode=mode)
        flags = [bool(x) for x in np.asarray(spec).reshape(-1)] if not isinstance(spec, (list, tuple)) else list(spec)
        if len(flags) != num_layers:
            raise QCacheError(f"lazy schedule has {len(flags)} entries, the model has {num_layers} layers")
        return cls(tuple(bool(x) for x in flags), mode or DEFAULT_MODE)

    # -- structure -----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.lazy)

    @property
    def lazy_layers(self) -> list[int]:
        return [i for i, f in enumerate(self.lazy) if f]

    @property
    def n_lazy(self) -> int:
        return sum(self.lazy)

    @property
    def is_dense(self) -> bool:
        return not any(self.lazy)

    @property
    def mask(self) -> np.ndarray:
        """The lazy flags as a bool array [L] (what a scanned layer loop takes as xs)."""
        return np.asarray(self.lazy, bool)

    @property
    def anchors(self) -> tuple[int, ...]:
        """a(l) for every layer."""
        out, current = [], 0
        for i, flag in enumerate(self.lazy):
            if not flag:
                current = i
            out.append(current)
        return tuple(out)

    def anchor(self, layer: int) -> int:
        return self.anchors[layer]

    @property
    def blocks(self) -> list[tuple[int, tuple[int, ...]]]:
        """The lazy blocks: (anchor, its lazy layers) for every anchor that has lazy layers."""
        out: dict[int, list[int]] = {}
        for l, a in enumerate(self.anchors):
            if self.lazy[l]:
                out.setdefault(a, []).append(l)
        return [(a, tuple(ls)) for a, ls in out.items()]

    def stores_k(self, layer: int) -> tuple[bool, bool]:
        """(stores visual K, stores text K) of ``layer`` in the KV cache: anchors both; a GLA
        lazy layer neither (it attends with its anchor's keys); a VLA lazy layer only the text
        keys (its visual keys are its anchor's)."""
        if not self.lazy[layer]:
            return True, True
        return False, self.mode == "vla"

    @property
    def unused_qk_layers(self) -> list[int]:
        """Layers that never use their q_proj/k_proj weights under this schedule: the GLA lazy
        layers (they attend with the anchor's queries and keys). A VLA lazy layer still needs
        its own for the text keys, so in VLA there are none."""
        return self.lazy_layers if self.mode == "gla" else []

    def hands_probs(self, layer: int) -> bool:
        """Whether ``layer`` is an anchor with a lazy block after it: in decode it hands its
        attention probabilities on, so the block's layers read only their V where they inherit
        (GLA: every key; VLA: the visual keys)."""
        return not self.lazy[layer] and any(a == layer for a, _ in self.blocks)

    def would_be_anchors(self) -> list[int | None]:
        """For each layer l >= 1 the anchor it has (lazy) or would have if it were made lazy:
        the nearest non-lazy layer below it. None for layer 0 (calibration compares with it)."""
        return [None] + list(self.anchors[:-1])

    # -- text and JSON ---------------------------------------------------------------------------

    def describe(self) -> str:
        """The lazy layers and mode in the one format every command prints: ``2,4-7 (gla)``,
        or ``none (dense)``."""
        if self.is_dense:
            return "none (dense)"
        return f"{format_layers(self.lazy_layers)} ({self.mode})"

    @property
    def label(self) -> str:
        """``dense`` or the mode: what a results table's mode column shows."""
        return "dense" if self.is_dense else self.mode

    def to_json(self, **details) -> dict:
        """The schedule JSON: ``lazy_layers``, ``num_layers``, ``mode``, plus ``details`` (for
        example a calibration's per-layer divergences or a tuning run's settings)."""
        return {"lazy_layers": self.lazy_layers, "num_layers": self.num_layers, "mode": self.mode, **details}

    def write(self, path, **details) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (``--lazy auto`` reads ``CKPT/schedule.json``)."""
        return write_atomic(Path(path), json.dumps(self.to_json(**details), indent=2) + "\n")
