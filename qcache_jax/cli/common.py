"""Options and helpers shared by the ``qcache`` subcommands."""

from __future__ import annotations

import argparse
import sys

from ..errors import QCacheError
from ..lazy.schedule import MODES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the description's line breaks."""


def add_parser(subparsers, name: str, *, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def positive(name: str, value, minimum: int = 1) -> None:
    """QCacheError naming the option when ``value`` is set and below ``minimum``."""
    if value is not None and value < minimum:
        raise QCacheError(f"{name} must be >= {minimum}, got {value}")


def add_lazy_options(p: argparse.ArgumentParser, *, default: str = "none") -> None:
    p.add_argument("--lazy", default=default, metavar="SPEC",
                   help="none | auto (the checkpoint's schedule.json) | layer ranges like 3-7,10 | a schedule JSON path")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="lazy mode; default: the mode the schedule file records, else vla")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress messages or bars on stderr")


def progress(args) -> bool:
    return not getattr(args, "quiet", False)


def log_for(args):
    """A progress logger printing to stderr, or None with ``--quiet``."""
    if not progress(args):
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def add_mesh_options(p: argparse.ArgumentParser) -> None:
    """``--mesh`` and ``--distributed`` (docs/architecture.md, "Scaling out")."""
    p.add_argument("--mesh", metavar="data=D,model=M", default=None,
                   help="run on a device mesh: D-way data parallel (batch rows) x M-way tensor parallel "
                        "(heads, MLP, vocabulary); D*M devices (on CPU: JAX_NUM_CPU_DEVICES=N); default: one device")
    p.add_argument("--distributed", metavar="auto|coordinator=HOST:PORT,processes=N,id=I", default=None,
                   help="join a multi-process run first (jax.distributed.initialize; auto: Cloud TPU, SLURM, "
                        "Open MPI, Kubernetes); run the same command in every process")


def mesh_arg(args):
    """The ``--mesh`` spec (checked) or None, after joining ``--distributed`` processes."""
    from ..runtime import mesh

    spec, dist = getattr(args, "mesh", None), getattr(args, "distributed", None)
    if spec is not None:
        mesh.parse_mesh(spec)
    if dist is not None:
        if spec is None:  # joined processes would each run the whole model alone
            raise QCacheError("--distributed needs --mesh: a mesh over every process's devices")
        mesh.parse_distributed(dist)
        mesh.initialize_distributed(dist)
    return spec


def load_model(args):
    """The checkpoint ``args.ckpt``, loaded with progress messages unless ``--quiet``, on the
    ``--mesh`` when one is given."""
    from ..api import load

    return load(args.ckpt, log=log_for(args), mesh=mesh_arg(args))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(name: str, text: str) -> int:
    """Bytes of a size like ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000``; QCacheError naming
    the option otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise QCacheError(f"{name}: {text!r} is not a size (e.g. 2GiB, 512MiB, 1.5GB or a number of bytes)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise QCacheError(f"{name} must be > 0, got {text!r}")
    return n
