"""``qcache eval CKPT --data JSONL``: exact-match VQA accuracy with dense, GLA or VLA attention."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_fastv_option, add_lazy_options, add_mesh_options, add_parser, add_quiet, fastv_options, \
    load_model, positive, progress


def run(args) -> int:
    from ..tools.evaluate import evaluate, format_result

    positive("--batch-size", args.batch_size)
    positive("--limit", args.limit)
    positive("--max-new-tokens", args.max_new_tokens)
    from ..io.checkpoint import read_config

    fastv = {}
    if getattr(args, "fastv", None) is not None:  # checked before loading
        fastv = fastv_options(args, read_config(Path(args.ckpt).expanduser()).text.num_layers)
    res = evaluate(load_model(args), args.data, lazy=args.lazy, mode=args.mode, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, limit=args.limit, progress=progress(args) and not args.json,
                   **fastv)
    if args.predictions:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in res.predictions))
    print(json.dumps(res.to_json()) if args.json else format_result(res))
    return 0


def register(sub) -> None:
    e = add_parser(sub, "eval", help="exact-match VQA accuracy on a JSONL file with dense, GLA or VLA attention")
    e.add_argument("ckpt", help="checkpoint directory")
    e.add_argument("--data", required=True, help='JSONL of {"image", "question", "answer"} (image paths relative to the file)')
    add_lazy_options(e)
    add_fastv_option(e)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--limit", type=int, help="score only the first N lines")
    e.add_argument("--predictions", help="write one JSON line per example (question, answer, prediction, correct)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    add_mesh_options(e)
    add_quiet(e)
    e.set_defaults(func=run)
