"""``qcache bench``: time dense and lazy generate on a checkpoint (or a random benchmark model).

    qcache bench CKPT [--batch B] [--prompt-tokens N] [--image-tokens N] [--new-tokens N]
                      [--lazy SPEC] [--mode vla|gla] [--json] [--repeats R]

CKPT is a checkpoint directory, or ``random:PRESET[:LAYERS]`` for a model of realistic shape
with random weights built locally (presets: ``cpu-300m``, ``llava-1.5-7b``, ``tiny``).
The inputs are synthetic: per row BOS, ``--image-tokens`` image tokens (a whole number of
images, random pixels) and ``--prompt-tokens`` random text tokens. EOS is disabled so every
row generates ``--new-tokens`` tokens. With a lazy schedule the dense model is timed too, in
alternating rounds, and ``speedup`` is lazy / dense decode tokens/s.
"""

from __future__ import annotations

import functools
import json

from ..errors import QCacheError


def register(subparsers) -> None:
    """Add the ``bench`` subcommand to the ``qcache`` argument parser's subparsers."""
    p = subparsers.add_parser(
        "bench", help="time prefill, decode tokens/s and KV cache bytes, dense vs lazy",
        description=__doc__.split("\n\n", 1)[1], formatter_class=_raw_formatter(),
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory, or random:PRESET[:LAYERS] (cpu-300m, llava-1.5-7b, tiny)")
    p.add_argument("--batch", type=int, default=1, help="rows generated together (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="text tokens per prompt besides BOS and images (default 32)")
    p.add_argument("--image-tokens", type=int, default=None, help="image tokens per row, a multiple of one image's tokens (default: one image)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default 32)")
    p.add_argument("--lazy", default="none", metavar="SPEC", help="none | auto | ranges like 3-7,10 | schedule JSON (default none)")
    p.add_argument("--mode", default="vla", choices=["vla", "gla"], help="lazy attention mode (default vla)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (and random weights)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run_bench)


def _raw_formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def bench_config(ckpt: str):
    """(config, loader) for a checkpoint directory or ``random:PRESET[:LAYERS]``: the config is
    read first so that bad options fail before any weights are built or loaded."""
    from ..tools import bench

    if ckpt.startswith("random:"):
        parts = ckpt.split(":")
        if len(parts) not in (2, 3) or parts[1] not in bench.PRESETS:
            raise QCacheError(f"{ckpt}: expected random:PRESET[:LAYERS] with PRESET one of {', '.join(bench.PRESETS)}")
        try:
            layers = int(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise QCacheError(f"{ckpt}: LAYERS must be an integer") from None
        cfg = bench.preset_config(parts[1], num_layers=layers)
        return cfg, lambda seed: _random_model(cfg, seed)
    from pathlib import Path

    from ..io.checkpoint import read_config

    path = Path(ckpt).expanduser()
    if not path.is_dir():
        raise QCacheError(f"{ckpt}: no such checkpoint directory")
    from .. import load

    return read_config(path), lambda seed: load(path)


@functools.lru_cache(maxsize=2)
def _random_model(cfg, seed):
    """Random benchmark models are kept (with their compiled executables) for repeated calls."""
    from ..tools import bench

    return bench.random_model(cfg, seed=seed)


def run_bench(args) -> int:
    from ..tools import bench
    from ..lazy.schedule import Schedule

    for name in ("batch", "new_tokens", "repeats"):
        low = 2 if name == "new_tokens" else 1
        if getattr(args, name) < low:
            raise QCacheError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.prompt_tokens < 0:
        raise QCacheError(f"--prompt-tokens must be >= 0, got {args.prompt_tokens}")
    cfg, loader = bench_config(args.ckpt)
    image_tokens = cfg.image_tokens_per_image if args.image_tokens is None else args.image_tokens
    bench.make_inputs(cfg, batch=1, prompt_tokens=0, image_tokens=image_tokens)  # validates --image-tokens
    ckpt_dir = None if args.ckpt.startswith("random:") else args.ckpt
    schedule = sched.resolve(args.lazy, cfg.text.num_layers, ckpt_dir)
    model = loader(args.seed)
    configs = {"dense": (None, args.mode)}
    if any(schedule):
        configs[args.mode] = (schedule, args.mode)
    results = bench.measure_many(
        model, configs, batch=args.batch, prompt_tokens=args.prompt_tokens, image_tokens=image_tokens,
        new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed,
    )
    report = bench_report(args.ckpt, results)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


# Fields of each run in the JSON report (and, in this order, the table's columns).
RUN_FIELDS = (
    "mode", "n_lazy", "num_layers", "lazy_layers", "batch", "prompt_tokens", "image_tokens", "new_tokens",
    "kv_cache_bytes", "dense_kv_cache_bytes", "kv_saved_fraction", "compile_seconds", "prefill_seconds",
    "decode_tokens_per_second", "decode_ms_per_step", "speedup", "generate_seconds", "repeats",
)


def bench_report(ckpt: str, results: dict) -> dict:
    """The JSON object ``qcache bench --json`` prints: environment, one entry per run, and the
    lazy/dense decode speedup (1.0 when only dense was run)."""
    from ..tools.bench import environment

    runs = [{k: r[k] for k in RUN_FIELDS} for r in results.values()]
    lazy = runs[-1]
    return {
        "checkpoint": ckpt,
        **environment(),
        "runs": runs,
        "speedup": lazy["speedup"],
        "kv_saved_fraction": lazy["kv_saved_fraction"],
    }


def format_report(report: dict) -> str:
    """A markdown table of a :func:`bench_report`."""
    lines = [
        f"qcache bench {report['checkpoint']}  (jax {report['jax_version']}, backend {report['backend']}, "
        f"device {report['device']}, {report['host']})",
        "",
        "| mode | lazy layers | batch | image tok | KV cache MiB | KV saved | compile s | prefill s | decode tok/s | ms/step | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['mode']} | {r['n_lazy']}/{r['num_layers']} | {r['batch']} | {r['image_tokens']} | "
            f"{r['kv_cache_bytes'] / 2**20:.1f} | {100 * r['kv_saved_fraction']:.1f}% | {r['compile_seconds']:.1f} | "
            f"{r['prefill_seconds']:.3f} | {r['decode_tokens_per_second']:.1f} | {r['decode_ms_per_step']:.1f} | "
            f"{r['speedup']:.2f}x |"
        )
    lines.append("")
    lines.append(f"medians of {report['runs'][0]['repeats']} rounds after one compiling warm-up call; speedup = decode tok/s / dense")
    return "\n".join(lines)
