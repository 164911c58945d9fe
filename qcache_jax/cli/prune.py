"""``qcache prune CKPT OUT``: a checkpoint without the q_proj/k_proj weights its GLA schedule never uses."""

from __future__ import annotations

from ..lazy.schedule import MODES
from .common import add_parser


def run(args) -> int:
    from ..tools.prune import prune

    print(prune(args.ckpt, args.out, lazy=args.lazy, mode=args.mode, force=args.force).describe())
    return 0


def register(sub) -> None:
    p = add_parser(sub, "prune", help="write a checkpoint without the q_proj/k_proj weights of its GLA lazy layers "
                                      "(it then runs only with that schedule: --lazy auto)")
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("out", help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--lazy", default="auto", metavar="SPEC",
                   help="auto (the checkpoint's schedule.json) | layer ranges like 3-7,10 | a schedule JSON path")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="gla (the only mode that prunes: VLA lazy layers use their q_proj/k_proj for text keys); "
                        "default: the schedule file's mode, gla for layer ranges")
    p.add_argument("--force", action="store_true", help="replace an existing OUT (only after success)")
    p.set_defaults(func=run)
