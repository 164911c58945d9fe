"""``qcache train-demo`` and ``qcache vqa-data``: the toy model trained on the synthetic VQA
task, and its evaluation sets."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import QCacheError
from .common import add_parser, add_quiet, positive, progress

DEFAULT_DEMO_OUT = "checkpoints/vqa-demo"


def run_train_demo(args) -> int:
    from ..demo import synthetic_vqa
    from ..demo.train_demo import train_demo
    from ..tools.evaluate import evaluate, format_result
    from ..tools.train import TrainConfig
    from ..tools.vqa import write_jsonl

    positive("--steps", args.steps)
    positive("--batch-size", args.batch_size)
    if not args.lr > 0:
        raise QCacheError(f"--lr must be > 0, got {args.lr}")
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                     warmup_steps=min(100, max(1, args.steps // 10)))
    out, history = train_demo(args.out, tc=tc, work_dir=args.work_dir, force=args.force, progress=progress(args))
    val = history["val"][-1][1] if history["val"] else float("nan")
    print(f"wrote {out} ({history['seconds']:.0f} s of training in this run; validation accuracy {val:.4f})")
    if args.test_examples:
        with tempfile.TemporaryDirectory() as d:
            exs = synthetic_vqa.split("test", args.test_examples, base_seed=args.seed)
            jsonl = write_jsonl(Path(d), exs, name="test.jsonl")
            res = evaluate(out, jsonl, progress=progress(args))
        print(format_result(res, "test (greedy generate): "))
    return 0


def run_vqa_data(args) -> int:
    from ..demo import synthetic_vqa
    from ..tools.vqa import write_jsonl

    positive("--count", args.count)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise QCacheError(f"{out} exists and is not empty (use --force)")
    exs = synthetic_vqa.split(args.split, args.count, base_seed=args.seed)
    path = write_jsonl(out, exs, name=f"{args.split}.jsonl", calibration_name=f"{args.split}-calibration.jsonl")
    print(f"wrote {path} ({args.count} examples) and {out / (args.split + '-calibration.jsonl')}")
    return 0


def register(sub) -> None:
    t = add_parser(sub, "train-demo", help="train the small toy VQA LLaVA from scratch (synthetic shapes task)")
    t.add_argument("--out", default=DEFAULT_DEMO_OUT, help="checkpoint directory to write")
    t.add_argument("--steps", type=int, default=1800)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warmup then cosine decay)")
    t.add_argument("--seed", type=int, default=0, help="data seed (train/validation/test splits derive from it)")
    t.add_argument("--work-dir", help="Orbax training state (default: .OUT.train beside OUT); a rerun resumes from it")
    t.add_argument("--test-examples", type=int, default=512, help="test-split examples scored at the end (0: skip)")
    t.add_argument("--force", action="store_true", help="replace an existing OUT")
    add_quiet(t)
    t.set_defaults(func=run_train_demo)

    d = add_parser(sub, "vqa-data", help="write a synthetic VQA evaluation set (PNG images + JSONL)")
    d.add_argument("out", help="output folder")
    d.add_argument("--split", default="test", choices=["train", "validation", "test"])
    d.add_argument("--count", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true", help="write into a non-empty folder")
    d.set_defaults(func=run_vqa_data)
