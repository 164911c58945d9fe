"""``make demo``: build a small random LLaVA locally, convert it, and run it against Hugging Face.

No download: the model is constructed with transformers from a fixed seed and saved under
.demo/, converted into checkpoints/tiny-random-llava, then run on a generated image.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

DEMO_HF = Path(".demo/hf-tiny-random-llava")
DEMO_CKPT = Path("checkpoints/tiny-random-llava")


def demo_image(size: int = 64, seed: int = 0):
    """A generated RGB picture (a coloured disc on a gradient) as a PIL image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 0.5 * (x + y)], -1) * 120
    cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [0.2]
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    img[disc] = rng.integers(100, 255, 3)
    return Image.fromarray(img.astype(np.uint8))


def build_demo_checkpoint() -> Path:
    """Build the seeded tiny HF model with tokenizer/processor and convert it (a few seconds)."""
    from .convert import convert_hf
    from .testing import build_hf_llava, save_hf

    shutil.rmtree(DEMO_HF, ignore_errors=True)
    model = build_hf_llava(seed=0, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=2)
    save_hf(model, DEMO_HF, with_processor=True)
    convert_hf(DEMO_HF, DEMO_CKPT, force=True, progress=False)
    return DEMO_CKPT


DEMO_SCHEDULE = "2-3,5-7"  # 5 of 8 layers lazy
DEMO_CALIB = Path(".demo/calibration")
CALIB_PROMPTS = ("what color is the circle ?", "where is the circle ?", "describe the picture .")


def write_calibration_data(folder: Path = DEMO_CALIB, n_images: int = 6) -> Path:
    """Generated pictures plus a prompts.txt: the folder form of `qcache calibrate --data`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        demo_image(seed=100 + i).save(folder / f"img{i}.png")
    (folder / "prompts.txt").write_text("\n".join(CALIB_PROMPTS) + "\n")
    return folder


def main() -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    from . import load

    t0 = time.perf_counter()
    ckpt = build_demo_checkpoint()
    model = load(ckpt)
    question = "what color is the circle ?"
    image = demo_image()
    enc = model.processor(
        images=[image],
        text=[
            model.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True,
            )
        ],
        return_tensors="np",
    )
    logits = model.logits(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    hf = LlavaForConditionalGeneration.from_pretrained(str(DEMO_HF)).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    print(
        f"\ncheckpoint {ckpt}: {model.num_layers} decoder layers, random weights (seeded), prompt of "
        f"{enc['input_ids'].shape[1]} tokens incl. {model.config.image_tokens_per_image} image tokens"
    )
    print(f"parity: max |logits(JAX) - logits(HF PyTorch)| = {np.abs(logits - ref).max():.2e} (float32)\n")

    rows = []
    for label, lazy, mode in (("dense", None, "vla"), ("GLA", DEMO_SCHEDULE, "gla"), ("VLA", DEMO_SCHEDULE, "vla")):
        first = model.generate(question, [image], lazy=lazy, mode=mode, max_new_tokens=24)
        res = model.generate(question, [image], lazy=lazy, mode=mode, max_new_tokens=24)  # steady state
        rows.append((label, lazy or "none", res, first.compile_seconds))
    print(
        f"{'mode':<6} {'lazy layers':<12} {'tokens':>6} {'KV bytes':>9} {'saved':>6} {'prefill ms':>10} {'tokens/s':>9} {'compile s':>9}"
    )
    for label, lazy, res, comp in rows:
        print(
            f"{label:<6} {lazy:<12} {len(res.token_ids[0]):>6} {res.kv_cache_bytes:>9} {100 * res.kv_saved_fraction:>5.1f}% "
            f"{res.prefill_seconds * 1e3:>10.1f} {res.decode_tokens_per_second:>9.0f} {comp:>9.1f}"
        )
    with torch.no_grad():
        hf_tokens = hf.generate(**{k: torch.tensor(v) for k, v in enc.items()}, max_new_tokens=24, do_sample=False)
    hf_tokens = hf_tokens[0, enc["input_ids"].shape[1] :].tolist()
    same = "yes" if hf_tokens == rows[0][2].token_ids[0] else "NO"
    print(f"\ndense greedy tokens identical to HF PyTorch generate(do_sample=False): {same}")
    print("generated text (random weights, so the words are noise):")
    for label, _, res, _ in rows:
        print(f"  {label:<6} {res.text[0]!r}")

    from .calibrate import calibrate, summary

    print("\ncalibration: qcache calibrate on generated pictures, 5 of 8 layers lazy (VLA)")
    cal = calibrate(model, write_calibration_data(), lazy_fraction=5 / 8, plot=ckpt / "schedule.png", progress=False)
    print(summary(cal))
    auto = model.generate(question, [image], lazy="auto", max_new_tokens=24)
    print(f"generate --lazy auto: layers {auto.lazy_layers} ({auto.mode}), KV saved {100 * auto.kv_saved_fraction:.1f}%,"
          f" {auto.decode_tokens_per_second:.0f} tokens/s")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
