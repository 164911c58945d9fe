"""Run every benchmark and write BENCHMARKS.md plus PNG plots (benchmarks/plots/).

    nice -n 10 python -m benchmarks.run                 # CPU profile, the committed BENCHMARKS.md
    python -m benchmarks.run --profile gpu              # full sizes (LLaVA-1.5-7B dims), on a GPU
    python -m benchmarks.run --profile smoke --out /tmp/B.md --plots /tmp/plots   # seconds, for tests

Sections (``--only`` picks some; names below):
  decode   decode tokens/s, KV bytes: dense vs GLA vs VLA at lazy fraction 0.7, over image tokens
           and batch (the headline table)
  fraction the same at lazy fractions 0.25, 0.5, 0.7
  prefill  prefill latency and compile time through QCacheModel.generate
  hf       Hugging Face PyTorch generate (sdpa) vs our dense and lazy generate, same weights
  memory   largest batch under a memory budget (from the cache array shapes)
  kernels  python -m qcache_jax.kernels.bench (attention kernels)
Every number is measured in this run (memory: computed from real array shapes); raw results
go to benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qcache_jax import bench  # noqa: E402

SECTIONS = ("decode", "prefill", "hf", "memory", "kernels")
GIB = 2**30

# Sizes per profile. CPU sizes are scaled down to fit a 2-core machine (stated in every table).
PROFILES = {
    "cpu": dict(
        preset="cpu-300m", layers=None, dtype="float32", prompt_tokens=32, new_tokens=6, rounds=3, warmup=False,
        decode_grid=((576, 4), (2880, 1), (2880, 4)), image_tokens=(576, 1152, 2880), fractions=(0.25, 0.5, 0.7),
        fraction_point=(2880, 4), prefill_image_tokens=(), prefill_repeats=3, hf_image_tokens=576, hf_batch=1,
        hf_new_tokens=16, memory_budget_gib=16, memory_preset_budgets=(("cpu-300m", None, "float32", 16),
                                                                       ("llava-1.5-7b", None, "float16", 80)),
    ),
    "gpu": dict(
        preset="llava-1.5-7b", layers=8, dtype="bfloat16", prompt_tokens=64, new_tokens=64, rounds=5, warmup=True,
        decode_grid=tuple((i, b) for i in (576, 1152, 2880) for b in (1, 8, 32)), image_tokens=(576, 1152, 2880),
        fractions=(0.25, 0.5, 0.7), fraction_point=(2880, 32), prefill_image_tokens=(576, 1152, 2880), prefill_repeats=5, hf_image_tokens=576, hf_batch=8,
        hf_new_tokens=64, memory_budget_gib=80, memory_preset_budgets=(("llava-1.5-7b", None, "float16", 80),),
    ),
    "smoke": dict(
        preset="tiny", layers=None, dtype="float32", prompt_tokens=8, new_tokens=4, rounds=1, warmup=False,
        decode_grid=((16, 1), (32, 2)), image_tokens=(16, 32), fractions=(0.5,), fraction_point=(32, 2),
        prefill_image_tokens=(16,), prefill_repeats=1, hf_image_tokens=16, hf_batch=1, hf_new_tokens=4,
        memory_budget_gib=1, memory_preset_budgets=(("tiny", None, "float32", 1),),
    ),
}


def lazy_configs(num_layers, fractions, modes=("gla", "vla")):
    """name -> (schedule, mode); dense first."""
    out = {"dense": ((False,) * num_layers, "gla")}
    for f in fractions:
        for m in modes:
            out[f"{m.upper()} {f:g}"] = (bench.lazy_schedule(num_layers, f), m)
    return out


def env_line(extra=""):
    e = bench.environment()
    return (f"_jax {e['jax_version']}, backend `{e['backend']}`, device {e['device']} ({e['host']}){extra}; "
            f"{datetime.date.today().isoformat()}._")


def mib(x):
    return f"{x / 2**20:,.1f}"


# -- sections ----------------------------------------------------------------------------------


def section_decode(model, p, log):
    """Decode throughput over (image tokens, batch) for dense, GLA and VLA (all fractions at
    ``fraction_point``, 0.7 elsewhere), from a synthetic post-prefill state (see DecodeBench)."""
    L = model.num_layers
    rows = []
    for img, batch in p["decode_grid"]:
        fr = p["fractions"] if (img, batch) == tuple(p["fraction_point"]) else (0.7,)
        benches = {}
        for name, (sched, mode) in lazy_configs(L, fr).items():
            t0 = time.perf_counter()
            benches[name] = bench.DecodeBench(
                model, batch=batch, prompt_tokens=p["prompt_tokens"], image_tokens=img, new_tokens=p["new_tokens"],
                lazy=sched, mode=mode, state="synthetic",
            )
            log(f"  decode bench ready: {img} image tokens, batch {batch}, {name} ({time.perf_counter() - t0:.0f}s)")
        res = bench.compare_decode(benches, rounds=p["rounds"], warmup=p["warmup"])
        for name, r in res.items():
            rows.append(dict(r, name=name, image_tokens=img, prompt_tokens=p["prompt_tokens"], new_tokens=p["new_tokens"],
                             lazy_fraction=r["n_lazy"] / r["num_layers"]))
        log(f"  {img} image tokens, batch {batch}: " + ", ".join(f"{n} {r['speedup']:.2f}x" for n, r in res.items()))
        del benches
    return rows


def section_prefill(model, p, log):
    L = model.num_layers
    rows = []
    for img in p["prefill_image_tokens"]:
        res = bench.measure_many(
            model, lazy_configs(L, (0.7,)), batch=1, prompt_tokens=p["prompt_tokens"], image_tokens=img,
            new_tokens=p["new_tokens"], repeats=p["prefill_repeats"],
        )
        for n, r in res.items():
            rows.append(dict(r, name=n))
        log(f"  prefill {img} image tokens: " + ", ".join(f"{n} {r['prefill_seconds']:.2f}s" for n, r in res.items()))
    return rows


def section_hf(p, log):
    """Same random weights in HF PyTorch (sdpa) and in our checkpoint (via convert_hf)."""
    import torch

    from qcache_jax import convert_hf, load

    cfg = bench.preset_config(p["preset"], num_layers=p["layers"], dtype="float32")
    torch.set_num_threads(bench._cpu_count())
    hf = bench.hf_model_for(cfg, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="qcache-bench-hf-"))
    try:
        hf.save_pretrained(str(tmp / "hf"))
        convert_hf(tmp / "hf", tmp / "ckpt", progress=False)
        model = load(tmp / "ckpt")
    finally:
        pass
    try:
        ids, pv = bench.make_inputs(cfg, batch=p["hf_batch"], prompt_tokens=p["prompt_tokens"], image_tokens=p["hf_image_tokens"])
        n = p["hf_new_tokens"]
        t0 = time.perf_counter()
        h = bench.hf_generate_times(hf, ids, pv, new_tokens=n, repeats=p["prefill_repeats"])
        log(f"  HF generate: prefill {h['prefill_seconds']:.2f}s, decode {h['decode_tokens_per_second']:.2f} tok/s "
            f"({time.perf_counter() - t0:.0f}s)")
        ours = bench.measure_many(
            model, lazy_configs(cfg.text.num_layers, (0.7,)), batch=p["hf_batch"], prompt_tokens=p["prompt_tokens"],
            image_tokens=p["hf_image_tokens"], new_tokens=n, repeats=p["prefill_repeats"],
        )
        b = p["hf_batch"]
        rows = [dict(name="HF PyTorch generate (sdpa)", prefill_seconds=h["prefill_seconds"],
                     decode_tokens_per_second=h["decode_tokens_per_second"], generate_seconds=h["generate_seconds"],
                     e2e_tokens_per_second=b * n / h["generate_seconds"], compile_seconds=0.0,
                     same_tokens_as_hf=True, torch_version=h["torch_version"], torch_threads=h["torch_threads"])]
        for name, r in ours.items():
            rows.append(dict(name=f"qcache-jax {name}", prefill_seconds=r["prefill_seconds"],
                             decode_tokens_per_second=r["decode_tokens_per_second"], generate_seconds=r["generate_seconds"],
                             e2e_tokens_per_second=b * n / r["generate_seconds"], compile_seconds=r["compile_seconds"],
                             same_tokens_as_hf=r["token_ids"] == h["token_ids"]))
        for r in rows:
            r["decode_vs_hf"] = r["decode_tokens_per_second"] / rows[0]["decode_tokens_per_second"]
            r["e2e_vs_hf"] = r["e2e_tokens_per_second"] / rows[0]["e2e_tokens_per_second"]
            r["prefill_vs_hf"] = rows[0]["prefill_seconds"] / r["prefill_seconds"]
        log("  " + ", ".join(f"{r['name']} decode {r['decode_vs_hf']:.2f}x" for r in rows))
        prefill = [dict(r, name=n) for n, r in ours.items()]
        return dict(rows=rows, prefill=prefill, batch=b, image_tokens=p["hf_image_tokens"], prompt_tokens=p["prompt_tokens"], new_tokens=n,
                    params=bench.count_params(model.params)[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def section_memory(p, log):
    rows = []
    for preset, layers, dtype, budget in p["memory_preset_budgets"]:
        cfg = bench.preset_config(preset, num_layers=layers, dtype=dtype)
        L = cfg.text.num_layers
        for img in p["image_tokens"]:
            text = bench.bucket_text(p["prompt_tokens"], p["new_tokens"])
            for name, (sched, mode) in lazy_configs(L, p["fractions"]).items():
                m = bench.max_batch(cfg, budget * GIB, image_tokens=bench.image_capacity(cfg, img), text_tokens=text,
                                    lazy=sched, mode=mode)
                rows.append(dict(m, preset=preset, num_layers=L, dtype=dtype, budget_gib=budget, image_tokens=img,
                                 image_capacity=bench.image_capacity(cfg, img), text_capacity=text, name=name))
    return rows


def section_kernels(log):
    from qcache_jax.kernels import bench as kbench

    return kbench.run(quick=True)


# -- report ------------------------------------------------------------------------------------


def _speed_table(rows, *, show_image=True):
    head = ("| config | lazy layers | batch | image tokens (cache capacity) | KV cache MiB | KV saved | "
            "decode tok/s | ms/step | **lazy/dense** | compile s |")
    out = [head, "|" + "---|" * head.count("|")[:-1] if False else "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['n_lazy']}/{r['num_layers']} | {r['batch']} | {r['image_tokens']} ({r['cache_image_len']}) | "
            f"{mib(r['kv_cache_bytes'])} | {100 * r['kv_saved_fraction']:.1f}% | {r['decode_tokens_per_second']:.2f} | "
            f"{r['decode_ms_per_step']:.0f} | **{r['speedup']:.2f}x** | {r['compile_seconds']:.0f} |"
        )
    return out


def split_decode(results: dict):
    """(rows at lazy fraction 0.7 and dense, rows of the fraction sweep point)."""
    rows = results.get("decode", [])
    main = [r for r in rows if r["name"] in ("dense", "GLA 0.7", "VLA 0.7")]
    point = tuple(results["meta"]["profile_sizes"]["fraction_point"])
    frac = [r for r in rows if (r["image_tokens"], r["batch"]) == point]
    return main, frac if len(frac) > 3 else []


def render(results: dict, plots_rel: str = "benchmarks/plots") -> str:
    """BENCHMARKS.md from the results dict (pure: tested on synthetic results)."""
    meta = results["meta"]
    main_rows, frac_rows = split_decode(results)
    p = meta["profile_sizes"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{meta['command']}` in {meta['elapsed_seconds'] / 60:.1f} min "
        f"(profile `{meta['profile']}`). Every number below was measured in that run (memory: computed from the cache array shapes); "
        "raw results in `benchmarks/results.json`. Re-run the command to refresh this file and `benchmarks/plots/`.",
        "",
        env_line(),
        "",
        f"**Model**: `{meta['preset']}`: {meta['model']}, random weights built locally "
        f"({meta['params'] / 1e6:.0f}M parameters, {meta['dtype']}). "
        f"Inputs per row: BOS, the image tokens (whole images of {meta.get('tokens_per_image', 576)} tokens), "
        f"{p['prompt_tokens']} random text tokens; greedy, EOS disabled, {p['new_tokens']} new tokens. Lazy schedules spread "
        "round(f*L) lazy layers evenly over layers 1..L-1 (speed depends only on how many layers are lazy).",
        "",
    ]
    if meta["profile"] == "cpu":
        lines += [
            "**Scaled down for a 2-core CPU**: the ~300M-parameter stand-in instead of LLaVA-1.5-7B, batch 1 and 4 "
            f"instead of 1, 8, 32, decode runs of {p['new_tokens']} tokens per row ({p['hf_new_tokens']} in the HF "
            "comparison). Times on this shared machine are noisy: compare the ratios "
            "(measured in alternating rounds, median of the per-round ratios), not the absolute times.",
            "",
            "**GPU: not yet measured on GPU** (no GPU was available for this run; "
            "`python -m benchmarks.run --profile gpu` runs LLaVA-1.5-7B dimensions with 8 layers at batch 1/8/32).",
            "",
        ]
    tg = results.get("targets")
    if tg:
        lines += ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
        for t in tg:
            lines.append(f"| {t['target']} | {t['measured']} | {t['status']} |")
        lines.append("")
    if main_rows:
        lines += [
            "## Decode throughput: dense vs GLA vs VLA (lazy fraction 0.7)",
            "",
            "Decode tokens/s of the engine's compiled `lax.while_loop` decode (`jax.jit` of `engine._decode_loop` for the "
            "plan `generate` builds), started from a state of exactly the post-prefill shapes and lengths filled with random "
            "keys/values (decode cost does not depend on the cache contents; this skips a batch x 2.9k-token prefill per "
            "configuration). `lazy/dense`: median over alternating rounds of the per-round tokens/s ratio. "
            f"{meta['profile_sizes']['new_tokens']} tokens per row per run ({meta['profile_sizes']['rounds']} rounds). "
            "Image-token capacity is what the engine allocates (image count bucketed to a power of two: 5 images -> 8).",
            "",
            *_speed_table(main_rows),
            "",
            "![decode speedup](benchmarks/plots/decode_speedup.png)",
            "",
        ]
    if frac_rows:
        r0 = frac_rows[0]
        lines += [
            f"## Lazy fraction sweep ({r0['image_tokens']} image tokens, batch {r0['batch']})",
            "",
            *_speed_table(frac_rows),
            "",
            "![fraction sweep](benchmarks/plots/fraction_sweep.png)",
            "",
        ]
    if "prefill" in results:
        lines += [
            "## Prefill latency and compile time (batch 1, through `QCacheModel.generate`)",
            "",
            "| config | image tokens | prompt length | prefill s (median) | prefill vs dense | compile s (prefill+decode) | first call s |",
            "|---|---|---|---|---|---|---|",
        ]
        dense = {r["image_tokens"]: r["prefill_seconds"] for r in results["prefill"] if r["name"] == "dense"}
        for r in results["prefill"]:
            lines.append(
                f"| {r['name']} | {r['image_tokens']} | {1 + r['image_tokens'] + r['prompt_tokens']} | {r['prefill_seconds']:.3f} | "
                f"{dense[r['image_tokens']] / r['prefill_seconds']:.2f}x | {r['compile_seconds']:.1f} | {r['first_call_seconds']:.1f} |"
            )
        lines += ["", f"Medians of {results['prefill'][0]['repeats']} calls after a compiling warm-up call.", ""]
    if "hf" in results:
        h = results["hf"]
        hf0 = h["rows"][0]
        lines += [
            "## Against Hugging Face PyTorch (same weights)",
            "",
            f"A random `LlavaForConditionalGeneration` of the same dimensions ({h['params'] / 1e6:.0f}M parameters, float32, "
            f"`attn_implementation=\"sdpa\"`, torch {hf0['torch_version']}, {hf0['torch_threads']} threads, eager mode) saved "
            "with `save_pretrained` and converted with `convert_hf`. Batch "
            f"{h['batch']}, {h['image_tokens']} image tokens, {h['new_tokens']} new tokens, greedy. HF prefill = median time of "
            "`generate(max_new_tokens=1)`; HF decode tok/s = (new tokens - 1) / (whole call - prefill). "
            "Ours: `QCacheModel.generate`'s own prefill and decode timings; compile time excluded (reported apart).",
            "",
            "| implementation | prefill s | decode tok/s | **decode vs HF** | end-to-end tok/s | end-to-end vs HF | same tokens as HF | compile s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in h["rows"]:
            lines.append(
                f"| {r['name']} | {r['prefill_seconds']:.3f} | {r['decode_tokens_per_second']:.2f} | **{r['decode_vs_hf']:.2f}x** | "
                f"{r['e2e_tokens_per_second']:.2f} | {r['e2e_vs_hf']:.2f}x | {'yes' if r['same_tokens_as_hf'] else 'no'} | "
                f"{r['compile_seconds']:.1f} |"
            )
        lines += ["", "![vs HF](benchmarks/plots/vs_hf.png)", ""]
    if "memory" in results:
        lines += [
            "## Largest batch under a memory budget",
            "",
            "Weights + KV cache <= budget, from the real cache array shapes (`init_state` under `jax.eval_shape`; nothing "
            "allocated; activations not counted). `rows`: cache rows that fit; `engine batch`: the largest power-of-two "
            f"batch bucket that fits. Text capacity per row: prompt + new tokens as the engine buckets them.",
            "",
            "| model | budget | image tokens (capacity) | config | KV MiB/row | rows | vs dense | engine batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        dense = {(r["preset"], r["image_tokens"]): r["rows"] for r in results["memory"] if r["name"] == "dense"}
        for r in results["memory"]:
            d = dense[(r["preset"], r["image_tokens"])]
            lines.append(
                f"| {r['preset']} ({r['num_layers']} layers, {r['dtype']}) | {r['budget_gib']} GiB | {r['image_tokens']} "
                f"({r['image_capacity']}) | {r['name']} | {mib(r['kv_bytes_per_row'])} | {r['rows']} | "
                f"{r['rows'] / d if d else float('nan'):.2f}x | {r['engine_batch']} |"
            )
        lines += ["", "![max batch](benchmarks/plots/max_batch.png)", ""]
    notes = NOTES.get(meta["profile"], [])
    if notes:
        lines += ["## Notes", "", *notes, ""]
    if "kernels" in results:
        lines += [results["kernels"].replace("\n## ", "\n### ").replace("## Attention kernels", "## Attention kernels", 1), ""]
    text = "\n".join(lines).rstrip() + "\n"
    return text.replace("](benchmarks/plots/", f"]({plots_rel}/")


def targets(results: dict, profile: str) -> list:
    out = []
    dec = split_decode(results)[0]
    gla = [r for r in dec if r["name"] == "GLA 0.7" and r["image_tokens"] == max(x["image_tokens"] for x in dec)] if dec else []
    if gla:
        best = max(gla, key=lambda r: r["batch"])
        sp = ", ".join(f"batch {r['batch']}: {r['speedup']:.2f}x" for r in gla)
        ok = best["speedup"] >= 1.3
        out.append(dict(target=f"GLA 0.7 / dense decode >= 1.3x on CPU, {best['image_tokens']} image tokens",
                        measured=sp, status=("met" if ok else "missed") + f" (at batch {best['batch']})"))
    out.append(dict(target="GLA / dense decode >= 1.6x on GPU at batch 32", measured="not yet measured on GPU", status="open"))
    hf = results.get("hf")
    if hf:
        dense = next(r for r in hf["rows"] if r["name"].endswith("dense"))
        dec_ok, e2e_ok = dense["decode_vs_hf"] >= 1.5, dense["e2e_vs_hf"] >= 1.5
        status = "met" if dec_ok and e2e_ok else (
            "met for decode; missed end-to-end (prefill, see Notes)" if dec_ok else "missed (see Notes)")
        out.append(dict(target="dense JAX generate >= 1.5x HF PyTorch eager (same CPU)",
                        measured=f"decode {dense['decode_vs_hf']:.2f}x, end-to-end {dense['e2e_vs_hf']:.2f}x "
                                 f"({hf['new_tokens']} new tokens), prefill {dense['prefill_vs_hf']:.2f}x",
                        status=status))
    return out


def plots(results: dict, outdir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    main_rows, frac_rows = split_decode(results)
    if main_rows:
        rows = main_rows
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["name"] for r in rows):
            for batch in sorted({r["batch"] for r in rows}):
                pts = sorted((r["image_tokens"], r["speedup"]) for r in rows if r["name"] == name and r["batch"] == batch)
                ax.plot(*zip(*pts), marker="o", label=f"{name}, batch {batch}")
        ax.axhline(1.3, ls=":", c="gray", label="CPU target 1.3x")
        ax.set_xlabel("image tokens per row")
        ax.set_ylabel("decode tokens/s vs dense")
        ax.set_title("Decode speedup (lazy fraction 0.7)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / "decode_speedup.png", dpi=100)
        plt.close(fig)
        written.append("decode_speedup.png")
    if frac_rows:
        rows = frac_rows
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for mode in ("gla", "vla"):
            pts = sorted((r["lazy_fraction"], r["speedup"], r["kv_saved_fraction"]) for r in rows if r["mode"] in (mode, "dense"))
            a1.plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=mode.upper())
            a2.plot([x[0] for x in pts], [100 * x[2] for x in pts], marker="o", label=mode.upper())
        a1.set_xlabel("lazy fraction")
        a1.set_ylabel("decode tokens/s vs dense")
        a2.set_xlabel("lazy fraction")
        a2.set_ylabel("KV cache saved (%)")
        a1.legend()
        a2.legend()
        fig.tight_layout()
        fig.savefig(outdir / "fraction_sweep.png", dpi=100)
        plt.close(fig)
        written.append("fraction_sweep.png")
    if "hf" in results:
        rows = results["hf"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        names = [r["name"].replace("qcache-jax ", "ours ").replace("HF PyTorch generate (sdpa)", "HF sdpa") for r in rows]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["decode_vs_hf"] for r in rows], 0.4, label="decode tok/s")
        ax.bar(x + 0.2, [r["e2e_vs_hf"] for r in rows], 0.4, label="end-to-end tok/s")
        ax.axhline(1.5, ls=":", c="gray", label="target 1.5x")
        ax.set_xticks(x, names)
        ax.set_ylabel("relative to HF PyTorch")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(outdir / "vs_hf.png", dpi=100)
        plt.close(fig)
        written.append("vs_hf.png")
    if "memory" in results:
        rows = results["memory"]
        presets = list(dict.fromkeys(r["preset"] for r in rows))
        fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.6), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            for name in dict.fromkeys(r["name"] for r in rows):
                pts = sorted((r["image_tokens"], r["rows"]) for r in rows if r["preset"] == preset and r["name"] == name)
                ax.plot(*zip(*pts), marker="o", label=name)
            r0 = next(r for r in rows if r["preset"] == preset)
            ax.set_title(f"{preset} ({r0['num_layers']} layers, {r0['dtype']}), {r0['budget_gib']} GiB", fontsize=9)
            ax.set_xlabel("image tokens per row")
            ax.set_ylabel("rows that fit")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(outdir / "max_batch.png", dpi=100)
        plt.close(fig)
        written.append("max_batch.png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None, help="sizes (default: gpu on a GPU, else cpu)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--plots", default=str(ROOT / "benchmarks" / "plots"))
    ap.add_argument("--results", default=None, help="raw results JSON (default: beside --plots, results.json)")
    ap.add_argument("--rerender", action="store_true", help="only re-render --out and plots from --results")
    args = ap.parse_args(argv)

    import jax

    profile = args.profile or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    p = PROFILES[profile]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    results_path = Path(args.results) if args.results else Path(args.plots).parent / "results.json"
    if args.rerender:
        results = json.loads(results_path.read_text())
        results["targets"] = targets(results, results["meta"]["profile"])
    else:
        results = run_sections(profile, p, only, argv)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, default=float))
    written = plots(results, Path(args.plots))
    rel = os.path.relpath(Path(args.plots).resolve(), Path(args.out).resolve().parent)
    text = render(results, plots_rel=Path(rel).as_posix())
    Path(args.out).write_text(text)
    print(f"wrote {args.out}, {results_path} and {len(written)} plots in {args.plots}", flush=True)
    return 0


def run_sections(profile, p, only, argv) -> dict:
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    cfg = bench.preset_config(p["preset"], num_layers=p["layers"], dtype=p["dtype"])
    results: dict = {}
    model = None
    if "decode" in only or ("prefill" in only and p["prefill_image_tokens"]):
        model = bench.random_model(cfg)
        log(f"model {p['preset']}: {bench.count_params(model.params)[0] / 1e6:.0f}M parameters")
    for name in only:
        log(f"section {name}")
        if name == "decode":
            results["decode"] = section_decode(model, p, log)
        elif name == "prefill" and p["prefill_image_tokens"]:
            results["prefill"] = section_prefill(model, p, log)
        elif name == "hf":
            model = None  # free the benchmark model's memory first
            results["hf"] = section_hf(p, log)
            if "prefill" not in results:  # the same generate calls give the prefill table
                results["prefill"] = results["hf"].pop("prefill")
        elif name == "memory":
            results["memory"] = section_memory(p, log)
        elif name == "kernels":
            results["kernels"] = section_kernels(log)
    t = cfg.text
    results["meta"] = dict(
        profile=profile, profile_sizes=p, preset=p["preset"], dtype=p["dtype"],
        params=bench.count_params(__import__("qcache_jax.convert", fromlist=["x"]).abstract_params(cfg)[1])[0],
        model=(f"{t.num_layers} decoder layers, hidden {t.hidden_size}, MLP {t.intermediate_size}, {t.num_heads} heads "
               f"(KV {t.num_kv_heads}) of {t.head_dim}, vocab {t.vocab_size}; CLIP {cfg.vision.num_layers} layers x "
               f"{cfg.vision.hidden_size}, {cfg.vision.image_size}px/{cfg.vision.patch_size} -> {cfg.image_tokens_per_image} tokens per image"),
        command="nice -n 10 python -m benchmarks.run" + (f" {' '.join(argv or sys.argv[1:])}" if (argv or sys.argv[1:]) else ""),
        elapsed_seconds=time.perf_counter() - t_start,
        environment=bench.environment(),
        tokens_per_image=cfg.image_tokens_per_image,
    )
    results["targets"] = targets(results, profile)
    return results


# Written from the profiles of this project's CPU runs (see the report); kept with the tables.
NOTES: dict = {
    "cpu": [
        "- **Why decode gains more than the KV bytes saved (CPU).** On CPU the attention runs on the `xla` path "
        "(`kernels/reference.py`: `decode_reference`, `lazy_pv_reference`). Its einsums make XLA transpose and copy each "
        "cache segment's K and V into head-major layout in every layer of every step (visible as cache-sized `transpose`/"
        "`copy` ops inside the decode `while` body of the optimized HLO), so decode attention runs far below memory "
        "bandwidth and dominates the step at long contexts. A GLA lazy layer skips Q K^T, the softmax and the K copy "
        "(it reuses the anchor's probabilities and reads only V), so its saving is larger than its KV-byte saving. "
        "A layout-preserving formulation (multiply-reduce over D in the cache's own [B, S, H, D] layout) is much "
        "faster in isolation, but a first attempt was slower inside the decode loop (different XLA fusion), so it is "
        "not a drop-in fix yet; with a faster CPU attention the lazy/dense ratio would move toward the bandwidth "
        "model (1 - saved bytes / bytes read per step).",
        "- **VLA saves less than GLA in decode**: a VLA lazy layer still projects its own query and key and scores all "
        "keys (the anchor's visual keys plus its own text keys); only the visual K is neither computed nor stored.",
        "- **Image-token capacity**: the engine buckets the image count per row to a power of two, so 2880 image tokens "
        "(5 images of 576) get a 4608-token visual segment; dense and lazy pay alike (ratios unaffected; KV bytes and "
        "time per step are higher than an exact-size cache would need).",
        "- **Prefill vs Hugging Face**: our CPU prefill is slower than PyTorch's. The `xla` prefill attention "
        "materializes the [B, H, T, T] float32 scores (about 70% of a dense prefill layer at T = 1024 here), and the "
        "engine pads the prompt to a power of two (609 tokens -> 1024), while `sdpa` runs a fused kernel on exactly 609 "
        "tokens. GLA prefill is faster than dense because XLA removes the lazy layers' repeated anchor scores (same q "
        "and K: common subexpression), leaving only P @ V. End-to-end throughput therefore depends on the number of new "
        "tokens; decode throughput is well above HF.",
        "- **HF decode on this CPU** is slow in absolute terms (PyTorch float32 matrix-vector products at 2 threads "
        "reached about 1.6 GB/s here); the decode ratio reflects that machine, measured in the same run.",
    ],
}

if __name__ == "__main__":
    sys.exit(main())
