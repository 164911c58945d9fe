"""``qcache prune``: a checkpoint without the weights its GLA schedule never uses.

A GLA lazy layer attends with its anchor's queries and keys (docs/method.md), so its own
``q_proj`` and ``k_proj`` are dead weight under that schedule. The pruned checkpoint drops
them, records the schedule (``schedule.json``: ``--lazy auto`` runs it) and which layers lost
the two projections (``pruned.json``); :func:`qcache_jax.load` restores it with empty
placeholders there, and :meth:`QCacheModel.check_schedule` refuses every schedule that would
need a removed weight. A VLA lazy layer still scores its text keys with its own query and
keys, so VLA schedules prune nothing and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

from .._files import atomic_output_dir
from ..errors import QCacheError
from ..io.checkpoint import (CONFIG_FILE, PARAMS_DIR, PARAMS_MANIFEST, PRUNED_FILE, PRUNED_PROJECTIONS, load_params,
                             read_config, read_pruned, save_checkpoint, without_projections)
from ..lazy.schedule import SCHEDULE_FILE, Schedule, format_layers


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """``out``: the pruned checkpoint; ``layers``: those without q_proj/k_proj; bytes of the
    two checkpoint directories."""

    out: Path
    schedule: Schedule
    layers: list
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        saved = 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        return (f"wrote {self.out}: removed q_proj/k_proj of layers {format_layers(self.layers)} "
                f"(schedule {self.schedule.describe()}); checkpoint {self.bytes_before:,} -> {self.bytes_after:,} bytes "
                f"({100 * saved:.1f}% smaller)")


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def prune(ckpt, out, *, lazy="auto", mode: str | None = None, force: bool = False) -> PruneResult:
    """Write ``out``: checkpoint ``ckpt`` without the q_proj/k_proj weights of the GLA lazy
    layers of schedule ``lazy`` (any SPEC form; ``auto``: the checkpoint's ``schedule.json``)
    in ``mode`` (None: the schedule file's, ``gla`` for layer ranges; must come out ``gla``). ``out`` is written atomically
    and replaces an existing directory only with ``force``."""
    ckpt = Path(ckpt).expanduser()
    out = Path(out).expanduser().absolute()
    cfg = read_config(ckpt)
    if mode is None and isinstance(lazy, str) and re.fullmatch(r"[\d,\s-]+", lazy):
        mode = "gla"  # bare layer ranges record no mode; the only one that prunes
    schedule = Schedule.resolve(lazy, cfg.text.num_layers, mode=mode, ckpt_dir=ckpt)
    if schedule.is_dense:
        raise QCacheError("nothing to prune: the schedule has no lazy layer (give --lazy SPEC or a checkpoint whose "
                          "schedule.json has lazy layers)")
    if schedule.mode != "gla":
        raise QCacheError("only GLA schedules can be pruned: a VLA lazy layer still uses its own q_proj/k_proj for "
                          "the text keys (give --mode gla)")
    if read_pruned(ckpt):
        raise QCacheError(f"{ckpt} is pruned already; prune the unpruned checkpoint")
    if out.exists() and not force:  # before reading any weight
        raise QCacheError(f"{out} already exists (use --force to overwrite)")
    layers = schedule.unused_qk_layers
    params = without_projections(load_params(ckpt, cfg), layers)
    with atomic_output_dir(out, force=force) as tmp:
        save_checkpoint(tmp, cfg, params)
        for p in ckpt.iterdir():  # tokenizer, processor, HF config, adapters, ...: everything but the weights
            if p.name in (PARAMS_DIR, PARAMS_MANIFEST, CONFIG_FILE, SCHEDULE_FILE):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        schedule.write(tmp / SCHEDULE_FILE, pruned_from=str(ckpt.absolute()))
        (tmp / PRUNED_FILE).write_text(json.dumps({"layers": layers, "projections": list(PRUNED_PROJECTIONS),
                                                   "schedule": schedule.to_json()}, indent=2) + "\n")
    return PruneResult(out, schedule, layers, directory_bytes(ckpt), directory_bytes(out))
