"""``qcache convert SRC OUT``: a Hugging Face checkpoint (directory, Hub id or GGUF file) -> Orbax."""

from __future__ import annotations

from .common import add_parser


def run(args) -> int:
    from ..io.convert import convert_hf

    out = convert_hf(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    c = add_parser(sub, "convert", help="convert a Hugging Face LLaVA / text-only checkpoint or a GGUF file to an Orbax checkpoint")
    c.add_argument("src", help="local Hugging Face model directory, a .gguf file, or a Hub id (needs a network)")
    c.add_argument("out", help="output checkpoint directory (must not exist unless --force)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--force", action="store_true", help="replace an existing OUT (only after success)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run)
