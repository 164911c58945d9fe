"""``qcache generate``: chat-template a prompt (with images), generate, report speed and KV bytes."""

from __future__ import annotations

import json
import sys

from .schedule import describe


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def run(args) -> int:
    from .api import load

    model = load(args.ckpt)
    options = dict(
        lazy=args.lazy,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        raw=args.raw,
    )
    if args.stream and not args.json:
        return _stream(model, args, options)
    res = model.generate(args.prompt, args.image or [], **options)
    if args.json:
        print(json.dumps(res.to_json(row=0)))
        return 0
    print(res.text[0])
    lazy = describe(tuple(i in res.lazy_layers for i in range(model.num_layers)))
    print(
        f"[{len(res.token_ids[0])} tokens | prefill {res.prefill_seconds * 1e3:.1f} ms | "
        f"decode {res.decode_tokens_per_second:.1f} tokens/s | KV cache {_human_bytes(res.kv_cache_bytes)} "
        f"vs {_human_bytes(res.dense_kv_cache_bytes)} dense ({100 * res.kv_saved_fraction:.1f}% saved) | "
        f"lazy layers {lazy} ({res.mode}) | compile {res.compile_seconds:.1f} s]",
        file=sys.stderr if args.quiet_stats else sys.stdout,
    )
    return 0


def _stream(model, args, options) -> int:
    """Print the text as tokens arrive (decoding the whole prefix each time, so multi-token
    characters and detokenizer spacing come out right)."""
    ids, shown = [], ""
    for step in model.stream(args.prompt, args.image or [], **options):
        if step[0] is None:
            break
        ids.append(step[0])
        text = model.detokenize(ids) or ""
        print(text[len(shown) :], end="", flush=True)
        shown = text
    print()
    return 0


def register(sub) -> None:
    """Add the ``generate`` subcommand to an argparse subparsers object."""
    g = sub.add_parser("generate", help="generate text for a prompt and images with dense, GLA or VLA attention")
    g.add_argument("ckpt", help="checkpoint directory written by `qcache convert`")
    g.add_argument("--prompt", required=True, help="the user message (the chat template is applied unless --raw)")
    g.add_argument("--image", action="append", help="an image file; repeat for several (one placeholder each)")
    g.add_argument("--lazy", default="none", help="none | auto | layer ranges like 3-7,10 | a schedule JSON path")
    g.add_argument("--mode", choices=["vla", "gla"], help="default: the mode the schedule file records, else vla")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="use the prompt as is (write <image> placeholders yourself)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    g.add_argument(
        "--stream", action="store_true", help="print tokens as they are generated (a Python loop over the jitted step)"
    )
    g.add_argument("--quiet-stats", action="store_true", help="print the statistics line on stderr")
    g.set_defaults(func=run)
