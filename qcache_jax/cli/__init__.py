"""The ``qcache`` command line. User errors print one line on stderr and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from .errors import QCacheError


def _cmd_convert(args) -> int:
    from .convert import convert_hf

    out = convert_hf(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcache", description="Lazy Attention with Q Cache for LLaVA models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face LLaVA checkpoint to an Orbax checkpoint")
    c.add_argument("src", help="local Hugging Face model directory, or a Hub id (needs a network)")
    c.add_argument("out", help="output checkpoint directory (must not exist unless --force)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--force", action="store_true", help="replace an existing OUT (only after success)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    from . import bench_cli, calibrate_cli, generate_cli, train_cli

    generate_cli.register(sub)
    calibrate_cli.register(sub)
    bench_cli.register(sub)
    train_cli.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except QCacheError as e:
        print(f"qcache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
