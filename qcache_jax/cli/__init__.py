"""The ``qcache`` command line: one module per command. User errors print one line on stderr
and exit with status 2 (no traceback); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import sys

from ..errors import run_entry_point


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import bench, calibrate, convert, demo_data, evaluate, export, generate, prune, serve, tune

    p = argparse.ArgumentParser(prog="qcache", description="Lazy Attention with Q Cache for LLaVA models in JAX.")
    p.add_argument("--version", action="version", version=f"qcache-jax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, generate, serve, calibrate, bench, evaluate, tune, export, prune, demo_data):
        module.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_entry_point(f"qcache {args.command}", lambda: args.func(args),
                           oom_hint="try a smaller --batch, a shorter prompt or fewer --max-new-tokens")


def console() -> int:
    """The ``qcache`` executable: :func:`main` in a process of its own, which starts JAX with
    :func:`~qcache_jax.host_memory.use_lean_xla_flags` (calling :func:`main` from Python leaves
    the environment alone)."""
    from ..host_memory import use_lean_xla_flags

    use_lean_xla_flags()
    return main()


if __name__ == "__main__":
    sys.exit(console())
