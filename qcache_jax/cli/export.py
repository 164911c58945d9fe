"""``qcache export CKPT HF_DIR``: a checkpoint back to a Hugging Face model directory."""

from __future__ import annotations

from .common import add_parser


def run(args) -> int:
    from ..io.export import export_hf

    out = export_hf(args.ckpt, args.hf_dir, force=args.force)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    x = add_parser(sub, "export", help="write a checkpoint as a Hugging Face model directory (safetensors + config)")
    x.add_argument("ckpt", help="checkpoint directory")
    x.add_argument("hf_dir", help="output directory (must not exist unless --force)")
    x.add_argument("--force", action="store_true", help="replace an existing HF_DIR (only after success)")
    x.set_defaults(func=run)
