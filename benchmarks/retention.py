"""Accuracy retention of Lazy Attention on the trained VQA demo model -> RETENTION.md.

    PYTHONPATH=. python benchmarks/retention.py            # (make sure checkpoints/vqa-demo exists:
                                                           #  qcache train-demo)

Rows (all on the same test split, greedy generation through the chat template):

1. dense accuracy;
2. training-free: the calibrated schedule (``qcache_jax.calibrate``: JS divergence of attention
   rows on validation images, the lowest-divergence layers up to each lazy fraction), GLA and VLA;
3. after lazy-aware fine-tuning (``qcache tune``: task loss + KL to the dense model) on the same
   schedules, GLA and VLA.

Each row also gives the KV cache saved (real cache array shapes) and the decode tokens/s ratio
to dense, measured with ``qcache_jax.bench.measure`` (greedy, EOS disabled) on this machine.
Tuned checkpoints are written under ``--tuned-dir`` and reused on later runs when their
schedule.json records the same schedule, mode and steps (``--retune`` forces tuning again); the
5-of-8 ones are also the shipped ``checkpoints/vqa-demo-gla`` / ``-vla`` when ``--ship``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcache_jax import load, vqa_data  # noqa: E402
from qcache_jax.errors import QCacheError  # noqa: E402
from qcache_jax.evaluate import evaluate  # noqa: E402
from qcache_jax.schedule import SCHEDULE_FILE, describe  # noqa: E402


def fixed_schedule(num_layers: int, n_lazy: int) -> tuple[bool, ...]:
    """Fallback when calibration is unavailable: lazy layers spread like the demo's 2-3,5-7."""
    from qcache_jax.bench import lazy_schedule

    return lazy_schedule(num_layers, n_lazy / num_layers)


def calibrated_schedules(model, calib_jsonl: Path, counts, modes, work: Path, log) -> dict:
    """{(mode, n_lazy): (schedule, source)} from qcache_jax.calibrate when it exists."""
    out = {}
    try:
        from qcache_jax.calibrate import calibrate
    except ImportError:  # pragma: no cover - calibrate landed in parallel
        calibrate = None
    L = model.num_layers
    for mode in modes:
        for n in counts:
            if calibrate is None:
                out[(mode, n)] = (fixed_schedule(L, n), "fixed (calibration unavailable)")
                continue
            res = calibrate(model, calib_jsonl, lazy_fraction=n / L, mode=mode, out=work / f"schedule-{mode}-{n}.json", progress=False)
            out[(mode, n)] = (tuple(res.schedule), "calibrated")
            log(f"calibrated {mode} {n}/{L}: lazy {describe(res.schedule)}")
    return out


def speed(model, schedule, mode, args) -> dict:
    from qcache_jax.bench import measure

    return measure(model, batch=args.speed_batch, prompt_tokens=args.speed_prompt_tokens, image_tokens=model.config.image_tokens_per_image,
                   new_tokens=args.speed_new_tokens, lazy=schedule, mode=mode, repeats=args.speed_repeats)


def tuned_checkpoint(args, base: Path, schedule, mode: str, n: int, log) -> Path:
    from qcache_jax.train import tune

    path = Path(args.tuned_dir) / f"{base.name}-{mode}-{n}of{len(schedule)}"
    meta = path / SCHEDULE_FILE
    if path.is_dir() and meta.is_file() and not args.retune:
        s = json.loads(meta.read_text())
        if s.get("mode") == mode and s.get("lazy_layers") == [i for i, f in enumerate(schedule) if f] and s.get("tuned", {}).get("steps") == args.tune_steps:
            log(f"reusing {path}")
            return path
    t0 = time.perf_counter()
    tune(base, path, lazy=schedule, mode=mode, steps=args.tune_steps, distill=args.distill, force=True, progress=not args.quiet, log=log)
    log(f"tuned {mode} {describe(schedule)} in {time.perf_counter() - t0:.0f} s -> {path}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "checkpoints/vqa-demo"))
    p.add_argument("--out", default=str(ROOT / "RETENTION.md"))
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--calib-examples", type=int, default=64)
    p.add_argument("--lazy-counts", default="3,5,6", help="numbers of lazy layers (of 8) to report")
    p.add_argument("--modes", default="gla,vla")
    p.add_argument("--tune-steps", type=int, default=200)
    p.add_argument("--distill", type=float, default=1.0)
    p.add_argument("--tuned-dir", default=str(ROOT / ".demo/retention"))
    p.add_argument("--ship", type=int, default=5, help="copy the tuned checkpoints with this many lazy layers to CKPT-gla / CKPT-vla (0: no)")
    p.add_argument("--retune", action="store_true")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-prompt-tokens", type=int, default=16)
    p.add_argument("--speed-new-tokens", type=int, default=64)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved measurement rounds; the table gives the median ratio")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    t_start = time.perf_counter()

    base = Path(args.ckpt)
    if not base.is_dir():
        raise QCacheError(f"{base}: no checkpoint; train it first with `qcache train-demo`")
    model = load(base)
    L = model.num_layers
    counts = [int(c) for c in args.lazy_counts.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    work = Path(args.tuned_dir)
    data_dir = work / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    test_jsonl = vqa_data.write_jsonl(data_dir, vqa_data.split("test", args.test_examples), name="test.jsonl")
    calib_dir = data_dir / "calib"
    vqa_data.write_jsonl(calib_dir, vqa_data.split("validation", args.calib_examples), name="val.jsonl", calibration_name="calib.jsonl")

    rows = []

    def add(label, m, schedule, mode, kind):
        res = evaluate(m, test_jsonl, lazy=schedule, mode=mode)
        rows.append({"label": label, "kind": kind, "mode": "dense" if not any(schedule) else mode, "schedule": tuple(schedule),
                     "lazy": describe(tuple(schedule)), "n_lazy": sum(schedule),
                     "accuracy": res.accuracy, "yes_no": res.yes_no_accuracy, "per_kind": res.per_kind})
        log(f"{label:<34} acc {res.accuracy:.4f}")

    add("dense", model, (False,) * L, "vla", "dense")
    schedules = calibrated_schedules(model, calib_dir / "calib.jsonl", counts, modes, work, log)
    for n in counts:
        for mode in modes:
            sched, src = schedules[(mode, n)]
            add(f"training-free {mode.upper()} {n}/{L}", model, sched, mode, f"training-free ({src})")
    for n in counts:
        for mode in modes:
            sched, src = schedules[(mode, n)]
            path = tuned_checkpoint(args, base, sched, mode, n, log)
            add(f"tuned {mode.upper()} {n}/{L}", load(path), sched, mode, f"lazy-aware tuned ({args.tune_steps} steps)")
            if args.ship and n == args.ship:
                dst = base.parent / f"{base.name}-{mode}"
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(path, dst)
                log(f"shipped {dst}")

    # Speed depends only on the schedule and mode (not on the weights): measured on the base model,
    # every configuration once per round, rounds interleaved so a change of machine load hits all alike.
    configs = sorted({(r["schedule"], r["mode"]) for r in rows}, key=lambda c: (sum(c[0]), c[1]))
    runs = {c: [] for c in configs}
    for _ in range(args.speed_rounds):
        for c in configs:
            runs[c].append(speed(model, c[0], "vla" if c[1] == "dense" else c[1], args))
    dense_key = ((False,) * L, "dense")
    for r in rows:
        mine, dense_runs = runs[(r["schedule"], r["mode"])], runs[dense_key]
        ratios = sorted(a["decode_tokens_per_second"] / b["decode_tokens_per_second"] for a, b in zip(mine, dense_runs))
        r["kv_saved"] = mine[0]["kv_saved_fraction"]
        r["tok_s"] = sorted(x["decode_tokens_per_second"] for x in mine)[len(mine) // 2]
        r["ratio"] = ratios[len(ratios) // 2]
    dense_speed = dict(runs[dense_key][0], decode_tokens_per_second=rows[0]["tok_s"])
    write_markdown(Path(args.out), rows, args, base, time.perf_counter() - t_start, dense_speed)
    print(f"wrote {args.out}")
    return 0


def write_markdown(path: Path, rows, args, base: Path, seconds: float, dense_speed: dict) -> None:
    dense = rows[0]
    info = json.loads((base / "training.json").read_text()) if (base / "training.json").is_file() else {}
    lines = [
        "# Accuracy retention of Lazy Attention on the trained VQA demo model",
        "",
        f"Generated by `PYTHONPATH=. python benchmarks/retention.py` on {datetime.date.today().isoformat()} "
        f"({platform.machine()} CPU; {seconds / 60:.0f} min including tuning). Model: "
        f"`{base.name}` (CLIP tower + 8-layer Llama decoder trained from scratch by `qcache train-demo`"
        + (f", {info['train']['steps']} steps" if info else "") + "). "
        f"Test set: {args.test_examples} synthetic questions (test split), exact match of greedy answers. "
        "Schedules: calibrated with `qcache_jax.calibrate` (JS divergence, lowest-divergence layers up to the "
        f"fraction) on {args.calib_examples} validation images. Tuned rows: `qcache tune` for {args.tune_steps} steps "
        f"(task loss + {args.distill:g} x KL to the dense logits) on the same schedule.",
        "",
        "KV saved: fraction of the dense KV cache bytes not allocated (real cache arrays, one image of "
        f"{dense_speed['image_tokens']} tokens + {args.speed_prompt_tokens} text + {args.speed_new_tokens} new tokens). "
        f"Decode speed: `qcache_jax.bench.measure`, batch {args.speed_batch}, {args.speed_new_tokens} new tokens, "
        f"median of {args.speed_repeats} per round; the ratio to dense ({dense_speed['decode_tokens_per_second']:.0f} tokens/s) is the median over "
        f"{args.speed_rounds} interleaved rounds. The machine (2 cores) was shared with other jobs, so the ratios are noisy; "
        "at this model size (hidden 96, 16 image tokens) a decode step is dominated by per-layer overheads, not by KV traffic.",
        "",
        "| setting | mode | lazy layers | accuracy | % of dense | yes/no acc | KV saved | decode tok/s ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keep = 100 * r["accuracy"] / dense["accuracy"] if dense["accuracy"] else float("nan")
        yn = f"{r['yes_no']:.3f}" if r["yes_no"] is not None else "-"
        lines.append(
            f"| {r['kind']} | {r['mode']} | {r['lazy']} ({r['n_lazy']}/8) | {r['accuracy']:.4f} | {keep:.1f}% | {yn} | "
            f"{100 * r['kv_saved']:.1f}% | {r['ratio']:.2f}x |"
        )
    lines += ["", "Per question kind (accuracy):", "", "| setting | mode | lazy | " + " | ".join(dense["per_kind"]) + " |",
              "|---|---|---|" + "---|" * len(dense["per_kind"])]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['mode']} | {r['lazy']} | " + " | ".join(f"{r['per_kind'].get(k, float('nan')):.3f}" for k in dense["per_kind"]) + " |")
    lines += ["", NOTES]
    path.write_text("\n".join(lines) + "\n")


NOTES = """Notes:

- KV saved follows method.md: GLA saves n_lazy / (2 L) of the cache (no K for lazy layers); VLA saves
  n_lazy / (2 L) x (image tokens / cached tokens), small here because one 64x64 image is only 16 tokens
  of 96 cached. LLaVA-1.5's 576 image tokens make the VLA saving much larger (see BENCHMARKS).
- Training-free numbers are measured as they come. This small model is trained to (near) perfect accuracy
  on a clean task, and the calibrated schedules put the lazy layers where adjacent-layer attention is
  most alike, so moderate fractions can cost nothing; the most aggressive fraction shows the loss that
  lazy-aware tuning then recovers. With a weaker, briefly trained model (the PyTorch prototype in issue 8,
  dense ~0.70) training-free lazy attention lost about a third of the accuracy.
- Tuned checkpoints record their schedule and mode in schedule.json (`--lazy auto`); the 5-of-8 ones
  are shipped as checkpoints/vqa-demo-gla and checkpoints/vqa-demo-vla."""


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QCacheError as e:
        print(f"retention: error: {e}", file=sys.stderr)
        sys.exit(2)
