"""Run by tests/test_qwen2_vl.py in a subprocess with 4 CPU devices (the test process keeps one):
a converted tiny Qwen2.5-VL on meshes (2, 2), (1, 4) and (4, 1) against one device, lazy VLA
logits and greedy generate. Prints one JSON object."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_qwen2_vl as T  # noqa: E402

from qcache_jax import convert_hf, load  # noqa: E402

d = Path(tempfile.mkdtemp())
hf = T._hf_model("qwen2_5_vl", seed=1)
hf.save_pretrained(str(d / "hf"))
ckpt = convert_hf(d / "hf", d / "ckpt", progress=False)
one = load(ckpt)
ids, pv, grid = T._batch(np.random.default_rng(0), [[(1, 4, 6)], [(1, 6, 4)]])
kw = dict(image_grid_thw=grid, lazy="1-2", mode="vla")
ref = one.logits(ids, pv, **kw)
tokens = one.generate(input_ids=ids, pixel_values=pv, max_new_tokens=5, eos_token_id=-1, **kw).token_ids
out = {}
for mesh in ("data=2,model=2", "model=4", "data=4"):
    m = load(ckpt, mesh=mesh)
    got = m.generate(input_ids=ids, pixel_values=pv, max_new_tokens=5, eos_token_id=-1, **kw).token_ids
    out[mesh] = {"logits_diff": float(np.abs(m.logits(ids, pv, **kw) - ref).max()), "same_tokens": got == tokens}
print(json.dumps(out))
