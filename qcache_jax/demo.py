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


def build_demo_checkpoint(force: bool = False) -> Path:
    """Build (once) the seeded tiny HF model with tokenizer/processor and convert it."""
    from .convert import convert_hf
    from .testing import build_hf_llava, save_hf

    if DEMO_CKPT.exists() and DEMO_HF.exists() and not force:
        return DEMO_CKPT
    shutil.rmtree(DEMO_HF, ignore_errors=True)
    model = build_hf_llava(seed=0, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=2)
    save_hf(model, DEMO_HF, with_processor=True)
    convert_hf(DEMO_HF, DEMO_CKPT, force=True)
    return DEMO_CKPT


def main() -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    from . import load

    t0 = time.perf_counter()
    ckpt = build_demo_checkpoint()
    model = load(ckpt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}]
    prompt = model.processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = model.processor(images=[demo_image()], text=[prompt], return_tensors="np")
    logits = model.logits(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    hf = LlavaForConditionalGeneration.from_pretrained(str(DEMO_HF)).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    print(f"checkpoint: {ckpt}  ({model.num_layers} decoder layers, prompt of {inputs['input_ids'].shape[1]} tokens)")
    print(f"max |logits(JAX) - logits(HF PyTorch)| = {np.abs(logits - ref).max():.2e}  (float32)")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
