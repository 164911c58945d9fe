"""``qcache bench``: time dense and lazy generate on a checkpoint or a random benchmark model.

CKPT is a checkpoint directory, or random:PRESET[:LAYERS] for a model with random weights
built on the spot (presets: cpu-300m, tiny, tiny-text, llava-1.5-7b; LLaVA-NeXT: next-cpu,
tiny-next, llava-next-7b; Qwen2.5-VL: qwen-cpu, qwen2.5-vl-7b). The inputs are synthetic: per
row BOS, --image-tokens image tokens (whole images, random pixels) and --prompt-tokens random
text tokens; EOS is disabled, so every row generates --new-tokens tokens. A model whose weights
alone exceed the memory available is refused before anything is built.

Qwen2.5-VL (the Qwen presets, or a Qwen2-VL checkpoint) gets one image per row of exactly
--image-tokens visual tokens (default 256: a 448x448 image), its patch grid as square as that
count allows.

The model runs in a worker process pinned to --threads CPUs. With a lazy schedule
dense runs too, in alternating rounds: lazy/dense is the ratio of the median decode
tokens/s, printed beside the bandwidth model's prediction (dense bytes read per decode step
/ lazy bytes read per step). Compile time (the first call) is reported apart.

LLaVA-NeXT (the NeXT presets, or a NeXT checkpoint) gets real anyres inputs: one image per row,
as LlavaNextProcessor gives it (pixel values of its base view and tiles, and its image size),
with as many image tokens as the model's own packing gives that size (base view + the unpadded
tile grid + one image_newline per grid row). --image-tokens picks the image size: by default
the largest pinpoint grid, filled (next-cpu and llava-next-7b: 672x672, 576 + 2x2 tiles of 576
+ 48 newlines = 2928 tokens; tiny-next: 56x56, 88 tokens); a count no image size gives is an
error naming the nearest ones.

The full benchmark against Hugging Face and llama.cpp is python -m benchmarks.run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QCacheError
from .common import HelpFormatter, add_fastv_option, add_lazy_options, fastv_options, positive


def register(subparsers) -> None:
    """Add the ``bench`` subcommand to the ``qcache`` argument parser's subparsers."""
    p = subparsers.add_parser(
        "bench", help="time prefill, decode tokens/s and KV cache bytes, dense vs lazy",
        description=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter,
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory, or random:PRESET[:LAYERS]")
    p.add_argument("--batch", type=int, default=1, help="rows generated together")
    p.add_argument("--prompt-tokens", type=int, default=32, help="random text tokens per row besides BOS and images")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="image tokens per row: a multiple of one image's tokens (LLaVA-NeXT: the tokens of one image "
                        "of some size, which is then used); None = one image (0 for a text-only model)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (>= 2)")
    add_lazy_options(p)
    add_fastv_option(p)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up call")
    p.add_argument("--threads", type=int, default=None, help="CPUs the worker is pinned to and threads it uses; None = every CPU available")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (and of random weights)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--mesh", metavar="data=D,model=M", default=None,
                   help="run on a device mesh (D*M devices; on CPU the worker gets D*M host devices); default: one device")
    p.set_defaults(func=run_bench)


def bench_config(ckpt: str):
    """(config, worker model argument, checkpoint dir or None) for CKPT, read without weights,
    so that bad options fail before anything is loaded."""
    from ..tools import bench

    if ckpt.startswith("random:"):
        preset, layers = bench.parse_random(ckpt)
        return bench.preset_config(preset, num_layers=layers), ckpt, None
    from ..io.checkpoint import read_config

    path = Path(ckpt).expanduser()
    if not path.is_dir():
        raise QCacheError(f"{ckpt}: no such checkpoint directory")
    return read_config(path), str(path.absolute()), path


def run_bench(args) -> int:
    from ..lazy.schedule import Schedule
    from ..tools import bench

    positive("--batch", args.batch)
    positive("--new-tokens", args.new_tokens, 2)
    positive("--repeats", args.repeats)
    positive("--prompt-tokens", args.prompt_tokens, 0)
    threads = bench.cpu_count() if args.threads is None else args.threads
    bench.pinned_cpus(threads)
    cfg, model_arg, ckpt_dir = bench_config(args.ckpt)
    image_tokens = bench.default_image_tokens(cfg) if args.image_tokens is None else args.image_tokens
    image_size = bench.image_size_for(cfg, image_tokens)  # validates --image-tokens (NeXT: its image size)
    bench.check_fits_memory(cfg, args.ckpt)
    schedule = Schedule.resolve(args.lazy, cfg.text.num_layers, mode=args.mode, ckpt_dir=ckpt_dir)
    req = {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "image_tokens": image_tokens,
           "new_tokens": args.new_tokens, "seed": args.seed}
    fastv = fastv_options(args, cfg.text.num_layers)
    configs = {"dense": None}
    if not schedule.is_dense or fastv:  # --fastv: the lazy (or dense) configuration with FastV on top
        configs[schedule.label + ("+fastv" if fastv else "")] = schedule
    if args.mesh is not None:
        from ..runtime.mesh import abstract_mesh, check_model, parse_mesh

        check_model(cfg, abstract_mesh(*parse_mesh(args.mesh)))
    with bench.Worker("ours", model_arg, threads=threads, seed=args.seed, mesh=args.mesh) as w:
        jobs = [bench.Job(name, w, dict(req, lazy=None if s is None else list(s.lazy), mode=None if s is None else s.mode,
                                        **(fastv if s is not None else {})))
                for name, s in configs.items()]
        results = {k: bench.summarize(v) for k, v in bench.interleave(jobs, args.repeats).items()}
    report = bench_report(args.ckpt, results, threads=threads, image_tokens=image_tokens, prompt_tokens=args.prompt_tokens,
                          image_size=image_size)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def bench_report(ckpt: str, results: dict, *, threads: int, image_tokens: int, prompt_tokens: int,
                 image_size=None) -> dict:
    """The JSON object ``qcache bench --json`` prints: the machine, one entry per configuration
    (medians), and the lazy/dense decode ratio beside the bandwidth model's. ``image_size``
    (LLaVA-NeXT): the (height, width) of each row's image; ``image_views``: its base view +
    tiles."""
    from ..tools import bench

    dense = results["dense"]
    runs = []
    for name, r in results.items():
        tok_s = r["decode_tokens_per_second"]
        runs.append({
            "config": name, "mode": r["mode"], "lazy_layers": r["lazy_layers"], "batch": r["batch"],
            "cache_rows": r["cache_rows"], "prompt_tokens": prompt_tokens, "image_tokens": image_tokens,
            "prompt_image_tokens": r.get("prompt_image_tokens"),  # counted in the input_ids the engine ran
            "image_size": None if image_size is None else list(image_size), "image_views": r.get("image_views"),
            "new_tokens": r["new_tokens"], "kv_cache_bytes": r["kv_cache_bytes"],
            "dense_kv_cache_bytes": r["dense_kv_cache_bytes"],
            "kv_saved_fraction": 1 - r["kv_cache_bytes"] / r["dense_kv_cache_bytes"],
            "bytes_per_step": r["step_bytes"]["bytes"], "compile_seconds": r["compile_seconds"],
            "prefill_seconds": r["prefill_seconds"], "decode_tokens_per_second": tok_s,
            "decode_ms_per_step": 1e3 * r["batch"] / tok_s if tok_s else None,
            "lazy_over_dense": tok_s / dense["decode_tokens_per_second"] if dense["decode_tokens_per_second"] else None,
            "model_lazy_over_dense": r["dense_step_bytes"]["bytes"] / r["step_bytes"]["bytes"],
            "peak_rss_bytes": r["peak_rss_bytes"], "repeats": r["rounds"],
        })
    m = bench.machine()
    return {"checkpoint": ckpt, "threads": threads, "cpu": m["cpu"], "versions": m["versions"], "runs": runs,
            "lazy_over_dense": runs[-1]["lazy_over_dense"], "model_lazy_over_dense": runs[-1]["model_lazy_over_dense"],
            "kv_saved_fraction": runs[-1]["kv_saved_fraction"]}


def format_report(report: dict) -> str:
    """A markdown table of a :func:`bench_report`."""
    v = report["versions"]
    first = report["runs"][0]
    lines = [f"qcache bench {report['checkpoint']}  ({report['cpu']}, {report['threads']} threads, jax {v['jax']})"]
    if first.get("image_size"):
        h, w = first["image_size"]
        lines.append(f"LLaVA-NeXT: one {h}x{w} image per row ({first['image_views']} views: base + tiles) -> "
                     f"{first['image_tokens']} image tokens; {first['prompt_tokens']} text tokens besides BOS")
    lines += [
        "",
        "| config | lazy layers | batch | KV cache MiB | KV saved | MiB read/step | compile s | prefill s | "
        "decode tok/s | ms/step | lazy/dense | model | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['config']} | {len(r['lazy_layers'])} | {r['batch']} | {r['kv_cache_bytes'] / 2**20:.1f} | "
            f"{100 * r['kv_saved_fraction']:.1f}% | {r['bytes_per_step'] / 2**20:.1f} | {r['compile_seconds']:.1f} | "
            f"{r['prefill_seconds']:.3f} | {r['decode_tokens_per_second']:.1f} | {r['decode_ms_per_step']:.1f} | "
            f"{r['lazy_over_dense']:.2f}x | {r['model_lazy_over_dense']:.2f}x | "
            f"{(r['peak_rss_bytes'] or 0) / 2**20:.0f} |"
        )
    lines += ["", f"medians of {report['runs'][0]['repeats']} alternating rounds after one compiling warm-up call; "
                  "lazy/dense: decode tokens/s over dense's; model: dense bytes per decode step / the row's"]
    return "\n".join(lines)
