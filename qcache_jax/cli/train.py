"""``qcache train-demo | tune | eval | export | vqa-data``: the trained demo model's commands.

Handlers return an exit code and raise :class:`~qcache_jax.errors.QCacheError` for user errors
(the ``qcache`` entry point prints those as one line).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import QCacheError
from .lazy_attention import MODES

DEFAULT_DEMO_OUT = "checkpoints/vqa-demo"


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _positive(name, value):
    if value is not None and value < 1:
        raise QCacheError(f"{name} must be >= 1, got {value}")


def cmd_train_demo(args) -> int:
    from . import vqa_data
    from .evaluate import evaluate, format_result
    from .train import TrainConfig, train_demo

    _positive("--steps", args.steps)
    _positive("--batch-size", args.batch_size)
    if not args.lr > 0:
        raise QCacheError(f"--lr must be > 0, got {args.lr}")
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                     warmup_steps=min(100, max(1, args.steps // 10)))
    out, history = train_demo(args.out, tc=tc, work_dir=args.work_dir, force=args.force, progress=_progress(args))
    val = history["val"][-1][1] if history["val"] else float("nan")
    print(f"wrote {out} ({history['seconds']:.0f} s of training in this run; validation accuracy {val:.4f})")
    if args.test_examples:
        with tempfile.TemporaryDirectory() as d:
            exs = vqa_data.split("test", args.test_examples, base_seed=args.seed)
            jsonl = vqa_data.write_jsonl(Path(d), exs, name="test.jsonl")
            res = evaluate(out, jsonl, progress=_progress(args))
        print(format_result(res, "test (greedy generate): "))
    return 0


def cmd_tune(args) -> int:
    from .train import tune

    _positive("--steps", args.steps)
    _positive("--batch-size", args.batch_size)
    if args.distill < 0:
        raise QCacheError(f"--distill must be >= 0, got {args.distill}")
    out = args.out or f"{str(args.ckpt).rstrip('/')}-{args.mode}"
    path, history = tune(
        args.ckpt, out, lazy=args.lazy, mode=args.mode, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, distill=args.distill, seed=args.seed, data=args.data, work_dir=args.work_dir,
        force=args.force, progress=_progress(args),
    )
    val = history["val"][-1][1] if history["val"] else float("nan")
    print(f"wrote {path} (lazy-aware {args.mode}; validation accuracy {val:.4f}; use --lazy auto --mode {args.mode})")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, format_result

    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    res = evaluate(args.ckpt, args.data, lazy=args.lazy, mode=args.mode, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, limit=args.limit, progress=_progress(args) and not args.json)
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in res.predictions))
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(format_result(res))
    return 0


def cmd_export(args) -> int:
    from .export import export_hf

    out = export_hf(args.ckpt, args.hf_dir, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_vqa_data(args) -> int:
    from . import vqa_data

    _positive("--count", args.count)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise QCacheError(f"{out} exists and is not empty (use --force)")
    exs = vqa_data.split(args.split, args.count, base_seed=args.seed)
    path = vqa_data.write_jsonl(out, exs, name=f"{args.split}.jsonl", calibration_name=f"{args.split}-calibration.jsonl")
    print(f"wrote {path} ({args.count} examples) and {out / (args.split + '-calibration.jsonl')}")
    return 0


def register(subparsers) -> None:
    """Add ``train-demo``, ``tune``, ``eval``, ``export`` and ``vqa-data`` to an argparse subparsers object."""
    t = subparsers.add_parser("train-demo", help="train the small VQA demo LLaVA from scratch (synthetic shapes task)")
    t.add_argument("--out", default=DEFAULT_DEMO_OUT, help=f"checkpoint directory to write (default {DEFAULT_DEMO_OUT})")
    t.add_argument("--steps", type=int, default=1800)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warmup then cosine decay)")
    t.add_argument("--seed", type=int, default=0, help="data seed (train/validation/test splits derive from it)")
    t.add_argument("--work-dir", help="Orbax training state (default: .OUT.train beside OUT); a rerun resumes from it")
    t.add_argument("--test-examples", type=int, default=512, help="test-split examples scored at the end (0: skip)")
    t.add_argument("--force", action="store_true", help="replace an existing OUT")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train_demo)

    u = subparsers.add_parser("tune", help="lazy-aware fine-tuning: continue training with a lazy schedule switched on")
    u.add_argument("ckpt", help="checkpoint directory (the dense model; also the distillation teacher)")
    u.add_argument("--lazy", required=True, help="layer ranges like 2-3,5-7 | auto | a schedule JSON path")
    u.add_argument("--mode", default="vla", choices=MODES)
    u.add_argument("--steps", type=int, default=200)
    u.add_argument("--out", help="output checkpoint (default: CKPT-MODE)")
    u.add_argument("--batch-size", type=int, default=32)
    u.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    u.add_argument("--distill", type=float, default=1.0, help="weight of KL(dense || lazy) on the answer tokens (0: task loss only)")
    u.add_argument("--data", help='JSONL of {"image", "question", "answer"} to train on (default: the synthetic VQA stream)')
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--work-dir", help="Orbax training state (default: .OUT.train beside OUT); a rerun resumes from it")
    u.add_argument("--force", action="store_true", help="replace an existing OUT")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_tune)

    e = subparsers.add_parser("eval", help="exact-match VQA accuracy on a JSONL file with dense, GLA or VLA attention")
    e.add_argument("ckpt", help="checkpoint directory")
    e.add_argument("--data", required=True, help='JSONL of {"image", "question", "answer"} (image paths relative to the file)')
    e.add_argument("--lazy", default="none", help="none | auto | layer ranges like 2-3,5-7 | a schedule JSON path")
    e.add_argument("--mode", default="vla", choices=MODES)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--limit", type=int, help="score only the first N lines")
    e.add_argument("--predictions", help="write one JSON line per example (question, answer, prediction, correct)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    x = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face LlavaForConditionalGeneration directory")
    x.add_argument("ckpt", help="checkpoint directory")
    x.add_argument("hf_dir", help="output directory (must not exist unless --force)")
    x.add_argument("--force", action="store_true")
    x.set_defaults(func=cmd_export)

    d = subparsers.add_parser("vqa-data", help="write a synthetic VQA evaluation set (PNG images + JSONL)")
    d.add_argument("out", help="output folder")
    d.add_argument("--split", default="test", choices=["train", "validation", "test"])
    d.add_argument("--count", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true")
    d.set_defaults(func=cmd_vqa_data)
