"""Generated pictures for the demo's calibration runs and the tests (no data set needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


DEMO_CALIB = Path(".demo/calibration")
CALIB_PROMPTS = ("what color is the circle ?", "where is the circle ?", "describe the picture .")


def write_calibration_data(folder: Path = DEMO_CALIB, n_images: int = 6) -> Path:
    """Generated pictures plus a prompts.txt: the folder form of `qcache calibrate --data`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        demo_image(seed=100 + i).save(folder / f"img{i}.png")
    (folder / "prompts.txt").write_text("\n".join(CALIB_PROMPTS) + "\n")
    return folder


