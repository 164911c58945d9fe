"""``qcache tune CKPT --lazy SPEC``: lazy-aware fine-tuning (task loss + distillation to dense)."""

from __future__ import annotations

from pathlib import Path

from ..errors import QCacheError
from .common import add_lazy_options, add_parser, add_quiet, progress, positive


def run(args) -> int:
    from ..tools.train import tune

    positive("--steps", args.steps)
    positive("--batch-size", args.batch_size)
    if args.distill < 0:
        raise QCacheError(f"--distill must be >= 0, got {args.distill}")
    if not args.lr > 0:
        raise QCacheError(f"--lr must be > 0, got {args.lr}")
    if args.data is None:
        from ..demo.train_demo import synthetic_source
        from ..io.checkpoint import read_config

        cfg = read_config(Path(args.ckpt))
        if cfg.anyres or cfg.family != "llava":
            raise QCacheError(f"{args.ckpt}: tune does not support LLaVA-NeXT or Qwen2-VL checkpoints yet")
        if cfg.vision is None:
            raise QCacheError(f"{args.ckpt}: a text-only checkpoint; the synthetic task needs images: pass --data")
        size = cfg.vision.image_size
        data = synthetic_source(args.seed, args.batch_size, image_size=size)
    else:
        data = args.data
    mode_tag = args.mode or "lazy"
    out = args.out or f"{str(args.ckpt).rstrip('/')}-{mode_tag}"
    path, history = tune(
        args.ckpt, out, lazy=args.lazy, mode=args.mode, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, distill=args.distill, seed=args.seed, data=data, work_dir=args.work_dir,
        force=args.force, progress=progress(args),
    )
    val = history["val"][-1][1] if history["val"] else float("nan")
    print(f"wrote {path} (lazy-aware tuning; validation accuracy {val:.4f}; generate with --lazy auto)")
    return 0


def register(sub) -> None:
    u = add_parser(sub, "tune", help="lazy-aware fine-tuning: continue training with a lazy schedule switched on")
    u.add_argument("ckpt", help="checkpoint directory (the dense model; also the distillation teacher)")
    add_lazy_options(u, default=None)
    u.add_argument("--steps", type=int, default=200)
    u.add_argument("--out", help="output checkpoint (default: CKPT-MODE)")
    u.add_argument("--batch-size", type=int, default=32)
    u.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    u.add_argument("--distill", type=float, default=1.0, help="weight of KL(dense || lazy) on the answer tokens (0: task loss only)")
    u.add_argument("--data", help='JSONL of {"image", "question", "answer"} to train on (default: the synthetic VQA stream)')
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--work-dir", help="Orbax training state (default: .OUT.train beside OUT); a rerun resumes from it")
    u.add_argument("--force", action="store_true", help="replace an existing OUT")
    add_quiet(u)
    u.set_defaults(func=run)
