"""The ``qcache`` command line: one module per command. User errors print one line on stderr
and exit with status 2 (no traceback); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import sys

from ..errors import QCacheError


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import bench, calibrate, convert, demo_data, evaluate, export, generate, tune

    p = argparse.ArgumentParser(prog="qcache", description="Lazy Attention with Q Cache for LLaVA models in JAX.")
    p.add_argument("--version", action="version", version=f"qcache-jax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, generate, calibrate, bench, evaluate, tune, export, demo_data):
        module.register(sub)
    return p


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    where = f"qcache {args.command}"
    try:
        return args.func(args)
    except QCacheError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only out-of-memory is turned into a user error
        if not _out_of_memory(e):
            raise
        print(
            f"{where}: error: out of memory ({type(e).__name__}); try a smaller --batch, a shorter prompt or "
            "fewer --max-new-tokens",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
