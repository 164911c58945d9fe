"""``qcache generate``: chat-template a prompt (with images), generate, report speed and KV bytes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import QCacheError
from .common import add_fastv_option, add_lazy_options, add_mesh_options, add_parser, add_quiet, fastv_options, \
    human_bytes, load_model


def _stats_line(n_tokens: int, prefill_s: float, tok_s: float, kv: int, dense: int, schedule, compile_s: float,
                fastv: str | None = None) -> str:
    saved = 1 - kv / dense if dense else 0.0
    pruned = f" | FastV {fastv}" if fastv else ""
    return (
        f"[{n_tokens} tokens | prefill {prefill_s * 1e3:.1f} ms | decode {tok_s:.1f} tokens/s | "
        f"KV cache {human_bytes(kv)} vs {human_bytes(dense)} dense ({100 * saved:.1f}% saved) | "
        f"lazy layers {schedule.describe()}{pruned} | compile {compile_s:.1f} s]"
    )


def run(args) -> int:
    from ..api import GenerateOptions
    from ..images import open_image
    from ..io.checkpoint import read_config
    from ..lazy.schedule import Schedule

    if args.stream and args.json:
        raise QCacheError("--stream and --json cannot be combined (--json prints one object when generation ends)")
    # Everything that can be checked without the weights is checked before loading them.
    cfg = read_config(Path(args.ckpt))
    options = GenerateOptions(
        **fastv_options(args, cfg.text.num_layers),
        lazy=args.lazy,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        raw=args.raw,
        max_context=args.max_context,
    )
    Schedule.resolve(args.lazy, cfg.text.num_layers, mode=args.mode, ckpt_dir=args.ckpt)
    for image in args.image or []:
        open_image(image)
    model = load_model(args)
    stats_out = sys.stderr if args.stats_to_stderr else sys.stdout
    if args.stream:
        return _stream(model, args, options, stats_out)
    res = model.generate(args.prompt, args.image or [], options=options)
    if args.json:
        print(json.dumps(res.to_json(row=0)))
        return 0
    print(res.text[0])
    print(
        _stats_line(len(res.token_ids[0]), res.prefill_seconds, res.decode_tokens_per_second, res.kv_cache_bytes,
                    res.dense_kv_cache_bytes, res.schedule, res.compile_seconds, res.fastv),
        file=stats_out,
    )
    return 0


def _stream(model, args, options, stats_out) -> int:
    """Print the text as tokens arrive (decoding the whole prefix each time, so multi-token
    characters and detokenizer spacing come out right), then the statistics line."""
    ids, shown, stats = [], "", {}
    t0 = time.perf_counter()
    for step in model.stream(args.prompt, args.image or [], options=options, stats=stats):
        if step[0] is None:
            break
        ids.append(step[0])
        text = model.detokenize(ids) or ""
        print(text[len(shown) :], end="", flush=True)
        shown = text
    print()
    decode_s = time.perf_counter() - t0 - stats["prefill_seconds"] - stats["compile_seconds"]
    tok_s = max(len(ids) - 1, 0) / decode_s if decode_s > 0 else 0.0
    print(
        _stats_line(len(ids), stats["prefill_seconds"], tok_s, stats["kv_cache_bytes"], stats["dense_kv_cache_bytes"],
                    stats["schedule"], stats["compile_seconds"]),
        file=stats_out,
    )
    return 0


def register(sub) -> None:
    g = add_parser(sub, "generate", help="generate text for a prompt and images with dense, GLA or VLA attention")
    g.add_argument("ckpt", help="checkpoint directory written by `qcache convert`")
    g.add_argument("--prompt", required=True, help="the user message (the chat template is applied unless --raw)")
    g.add_argument("--image", action="append", help="an image file; repeat for several (one placeholder each)")
    add_lazy_options(g)
    add_fastv_option(g)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + new tokens allowed (default: the model's max_position_embeddings)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="use the prompt as is (write the image placeholders yourself)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated, then the statistics")
    g.add_argument("--stats-to-stderr", action="store_true", help="print the statistics line on stderr, not stdout")
    add_mesh_options(g)
    add_quiet(g)
    g.set_defaults(func=run)
