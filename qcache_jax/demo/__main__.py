"""``make demo``: the shipped trained model answering questions with dense, GLA and VLA attention,
its accuracy / KV / speed table, a converter parity check and calibration. No download: the
trained checkpoints ship in checkpoints/, the random-weight model is built with transformers
from a fixed seed under .demo/ and converted into checkpoints/tiny-random-llava.
"""

from __future__ import annotations

from .pictures import CALIB_PROMPTS, DEMO_CALIB, demo_image, write_calibration_data  # noqa: F401

import shutil
import time
from pathlib import Path

import numpy as np

DEMO_HF = Path(".demo/hf-tiny-random-llava")
DEMO_CKPT = Path("checkpoints/tiny-random-llava")


def build_demo_checkpoint() -> Path:
    """Build the seeded tiny HF model with tokenizer/processor and convert it (a few seconds)."""
    from ..io.convert import convert_hf
    from .hf_models import build_hf_llava, save_hf

    shutil.rmtree(DEMO_HF, ignore_errors=True)
    model = build_hf_llava(seed=0, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=2)
    save_hf(model, DEMO_HF, with_processor=True)
    convert_hf(DEMO_HF, DEMO_CKPT, force=True, progress=False)
    return DEMO_CKPT


DEMO_SCHEDULE = "2-3,5-7"  # 5 of 8 layers lazy
SHIPPED = Path("checkpoints/vqa-demo")  # trained here by `qcache train-demo` (benchmarks/retention.py tunes the rest)
TUNED = {"gla": Path("checkpoints/vqa-demo-gla"), "vla": Path("checkpoints/vqa-demo-vla")}
EVAL_EXAMPLES = 64


def _answers_side_by_side(models: dict, n: int = 6) -> None:
    from .synthetic_vqa import split

    print(f"{'question':<34} {'truth':<10}" + "".join(f"{name:<14}" for name in models))
    for ex in split("test", n):
        answers = []
        for model, lazy, mode in models.values():
            res = model.generate(ex.question, [ex.image], lazy=lazy, mode=mode, max_new_tokens=8)
            answers.append(res.text[0].strip())
        print(f"{ex.question:<34} {ex.answer:<10}" + "".join(f"{a:<14}" for a in answers))


def _accuracy_table(models: dict, data: Path) -> None:
    from ..tools.evaluate import evaluate

    results = {name: evaluate(m, data, lazy=lazy, mode=mode) for name, (m, lazy, mode) in models.items()}
    dense = results["dense"]
    print(f"\n{'config':<22} {'lazy layers':<12} {'accuracy':>8} {'of dense':>9} {'KV saved':>9} {'decode tok/s':>13}")
    for name, r in results.items():
        lazy = ",".join(map(str, r.lazy_layers)) or "none"
        print(
            f"{name:<22} {lazy:<12} {r.accuracy:>8.3f} {100 * r.accuracy / dense.accuracy:>8.1f}% "
            f"{100 * r.kv_saved_fraction:>8.1f}% {r.decode_tokens_per_second:>13.0f}"
        )


def main() -> None:
    """The trained demo model answering questions dense, GLA and VLA; the random-weight
    model's parity against Hugging Face; calibration; all on this machine, no download."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from .. import load
    from ..tools.vqa import write_jsonl
    from .synthetic_vqa import split

    t0 = time.perf_counter()
    dense = load(SHIPPED)
    tuned = {mode: load(path) for mode, path in TUNED.items()}
    print(
        f"{SHIPPED}: a LLaVA-architecture model (CLIP tower + {dense.num_layers}-layer Llama decoder) trained here on "
        "synthetic pictures; the GLA/VLA checkpoints were fine-tuned with their lazy schedule on (schedule.json).\n"
    )
    models = {
        "dense": (dense, None, "vla"),
        "GLA tuned": (tuned["gla"], "auto", "gla"),
        "VLA tuned": (tuned["vla"], "auto", "vla"),
    }
    _answers_side_by_side(models)
    schedule = tuned["gla"].resolve_lazy("auto")
    models["GLA training-free"] = (dense, schedule, "gla")
    models["VLA training-free"] = (dense, schedule, "vla")
    data = write_jsonl(Path(".demo/vqa-test"), split("test", EVAL_EXAMPLES))
    print(f"\naccuracy on {EVAL_EXAMPLES} test questions (exact match, greedy), KV cache saved, decode speed:")
    _accuracy_table(models, data)
    print("(the full retention table at several lazy fractions: RETENTION.md, `python benchmarks/retention.py`)")

    # The converter path on a random-weight model: HF PyTorch -> Orbax -> same logits and tokens.
    ckpt = build_demo_checkpoint()
    model = load(ckpt)
    question, image = "what color is the circle ?", demo_image()
    prompt = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    enc = model.processor(images=[image], text=[prompt], return_tensors="np")
    hf = LlavaForConditionalGeneration.from_pretrained(str(DEMO_HF)).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
        hf_tokens = hf.generate(**{k: torch.tensor(v) for k, v in enc.items()}, max_new_tokens=16, do_sample=False)
    logits = model.logits(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    ours = model.generate(question, [image], max_new_tokens=16)
    same = hf_tokens[0, enc["input_ids"].shape[1] :].tolist() == ours.token_ids[0]
    print(f"\nconverter check on {ckpt} (random weights, built locally with transformers and converted):")
    print(
        f"  max |logits(JAX) - logits(HF PyTorch)| = {np.abs(logits - ref).max():.2e} (float32); "
        f"greedy tokens identical to HF generate: {'yes' if same else 'NO'}"
    )

    from ..tools.calibrate import calibrate, summary

    print("\ncalibration of the trained model (qcache calibrate) on generated pictures, 5 of 8 layers:")
    cal = calibrate(
        dense,
        write_calibration_data(),
        lazy_fraction=5 / 8,
        out=Path(".demo/schedule.json"),
        plot=Path(".demo/schedule.png"),
        progress=False,
    )
    print("  " + summary(cal).replace("\n", "\n  "))
    print(f"  wrote {cal.schedule_path} and {cal.plot_path}")
    print(f"\ndone in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
