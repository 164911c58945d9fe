"""Training: a step lowers the loss, Orbax save/resume is exact, lazy-aware tuning writes its
schedule, and the export round trip matches transformers. Tiny models, a few steps (CI never trains)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from qcache_jax import QCacheError, load
from qcache_jax.demo import synthetic_vqa as vqa_data
from qcache_jax.io.export import export_hf
from qcache_jax.lazy.schedule import SCHEDULE_FILE, Schedule
from qcache_jax.demo.train_demo import demo_model, synthetic_source, train_demo
from qcache_jax.tools.train import EVERYTHING, Adapters, Batcher, Split, TrainConfig, compiled_steps, fit, graphdef_for, init_params, tune

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vision_hidden=32,
            vision_layers=2, vision_heads=4, image_size=32, patch_size=8)
# One optimiser setting and batch shape for every test here: the train step compiles once.
TC = TrainConfig(steps=4, batch_size=8, warmup_steps=1, learning_rate=3e-3, save_every=2, eval_every=4)


@pytest.fixture(scope="module")
def tiny():
    hf_cfg, cfg, processor = demo_model(**TINY)
    graphdef = graphdef_for(cfg)
    batcher = Batcher(processor)
    batches = [batcher(vqa_data.examples(0, 8 * s, 8, image_size=32)) for s in range(4)]
    return hf_cfg, cfg, processor, graphdef, batches


def test_batch_layout(tiny):
    _, cfg, processor, _, batches = tiny
    b = batches[0]
    assert b["input_ids"].shape == (8, 32) and b["pixel_values"].shape == (8, 3, 32, 32)
    assert ((b["input_ids"] == cfg.image_token_id).sum(1) == cfg.image_tokens_per_image).all()
    # The scored positions predict the answer tokens then EOS: each is the token before its target.
    ex = vqa_data.example(0, 0, image_size=32)
    m = b["ans_mask"][0, 0] > 0
    tgt = b["ans_tgt"][0, 0][m]
    assert processor.tokenizer.decode(tgt[:-1]) == ex.answer and tgt[-1] == processor.tokenizer.eos_token_id
    pos = b["ans_pos"][0, 0][m]
    assert (b["input_ids"][0][pos[1:]] == tgt[:-1]).all()


def _steps(graphdef, params, tc=TC):
    split = Split.of(params, EVERYTHING)
    train, frozen = split.parts(params)
    state = {"params": train, "adapters": {}}
    return (*compiled_steps(graphdef, split, tc), state, frozen)


def test_one_step_lowers_the_loss(tiny):
    _, cfg, _, graphdef, batches = tiny
    params = init_params(cfg, 0)
    tx, train_step, eval_step, state, frozen = _steps(graphdef, params)
    before = float(eval_step(state, frozen, batches[0], None)[0])
    state, _, m = train_step(state, tx.init(state), frozen, batches[0], None, None)
    after = float(eval_step(state, frozen, batches[0], None)[0])
    assert np.isfinite(before) and after < before - 0.01
    assert float(m["loss"]) == pytest.approx(before, rel=1e-5)  # the step reports the loss before the update


def test_answer_logits_equal_the_full_forward(tiny):
    """The training forward (head at the scored positions only) computes the model's logits."""
    from flax import nnx

    from qcache_jax.runtime.forward import sequence_logits
    from qcache_jax.lazy.attention import LazyAttention
    from qcache_jax.tools.scoring import answer_logits

    _, cfg, _, graphdef, batches = tiny
    params = init_params(cfg, 2)
    b = batches[0]
    got = answer_logits(graphdef, params, b, None, mode="vla", impl="xla_train")
    full = sequence_logits(nnx.merge(graphdef, params), b["input_ids"], b["pixel_values"], b["attention_mask"],
                           attn=LazyAttention(impl="xla"))
    ref = np.take_along_axis(np.asarray(full), b["ans_pos"].reshape(8, -1)[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(got).reshape(ref.shape), ref, atol=1e-4, rtol=0)


def test_adapters_train_and_merge(tiny):
    """Low-rank adapters start as a no-op, train, and merge into the kernels they adapt."""
    _, cfg, _, graphdef, batches = tiny
    params = init_params(cfg, 3)
    frozen_everything = dataclasses.replace(EVERYTHING, new=())
    res = fit(graphdef, params, dataclasses.replace(TC, steps=2), lambda s: batches[s], trainable=frozen_everything,
              adapters=Adapters(rank=2, layers=(1, 2)), progress=False)
    key = "language_model/layers/1/mlp/up_proj/kernel"
    ab = res.state["adapters"][key]
    merged = np.asarray(res.params["language_model"]["layers"][1]["mlp"]["up_proj"]["kernel"])
    orig = np.asarray(params["language_model"]["layers"][1]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_allclose(merged, orig + np.asarray(ab["a"]) @ np.asarray(ab["b"]), atol=1e-6)
    assert np.abs(merged - orig).max() > 0  # it trained
    untouched = "language_model/layers/0/mlp/up_proj/kernel" not in res.state["adapters"]
    assert untouched and res.state["params"] == {}


def test_resume_gives_identical_next_steps(tiny, tmp_path):
    _, cfg, _, graphdef, batches = tiny
    params = init_params(cfg, 1)
    at = lambda s: batches[s % len(batches)]
    full = fit(graphdef, params, TC, at, progress=False).history
    first = fit(graphdef, params, TC, at, work_dir=tmp_path / "w", stop_after=3, progress=False).history
    assert first["end_step"] == 3  # "interrupted" after step 3; the last save was at step 3
    resumed = fit(graphdef, params, TC, at, work_dir=tmp_path / "w", progress=False).history
    assert resumed["start_step"] == 3
    np.testing.assert_array_equal(resumed["loss"], full["loss"][3:])
    # A different run in the same work directory is refused.
    with pytest.raises(QCacheError, match="other settings"):
        fit(graphdef, params, TrainConfig(steps=5), at, work_dir=tmp_path / "w", progress=False)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A tiny VQA model after a few training steps, written as a checkpoint by train_demo."""
    out = tmp_path_factory.mktemp("vqa") / "ckpt"
    path, history = train_demo(out, tc=TC, model_kwargs=TINY, val_examples=8, progress=False, log=None)
    assert path == out and len(history["loss"]) == 4 and len(history["val"]) == 1
    return out


def test_train_demo_checkpoint_loads(trained_ckpt):
    model = load(trained_ckpt)
    assert model.processor is not None and model.config.text.num_layers == TINY["num_layers"]
    assert not any(p.name.endswith(".train") for p in trained_ckpt.parent.iterdir())  # work dir removed
    ids, pv = model.encode("what color is the shape ?", [vqa_data.example(2, 0, image_size=32).image])
    assert pv.shape == (1, 3, 32, 32) and ids.count(model.config.image_token_id) == 16


def test_tune_writes_schedule_and_mode(trained_ckpt, tmp_path):
    data = synthetic_source(0, 4, image_size=32, val_examples=4)
    out, history = tune(trained_ckpt, tmp_path / "gla", lazy="2-3", mode="gla", data=data, steps=2, batch_size=4,
                        warmup_steps=1, distill=1.0, progress=False, log=None)
    sched = json.loads((out / SCHEDULE_FILE).read_text())
    assert sched["lazy_layers"] == [2, 3] and sched["mode"] == "gla" and sched["tuned"]["steps"] == 2
    assert np.isfinite(history["loss"]).all()
    model = load(out)
    # --lazy auto takes the schedule and the mode the tuning recorded, without --mode.
    assert model.resolve_lazy("auto") == Schedule((False, False, True, True), "gla")
    with pytest.raises(QCacheError, match="at least one lazy layer"):
        tune(trained_ckpt, tmp_path / "x", lazy="none", data=data, steps=1, progress=False, log=None)


def test_export_round_trip_matches_transformers(trained_ckpt, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf_dir = export_hf(trained_ckpt, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    proc = AutoProcessor.from_pretrained(str(hf_dir))
    model = load(trained_ckpt)
    exs = vqa_data.examples(2, 0, 3, image_size=32)
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}],
                                      add_generation_prompt=True) for e in exs]
    enc = proc(images=[e.image for e in exs], text=texts, return_tensors="np", padding=True)
    ours = model.logits(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    mask = enc["attention_mask"].astype(bool)
    assert np.abs(ours - ref)[mask].max() <= 1e-4
    with pytest.raises(QCacheError, match="already exists"):
        export_hf(trained_ckpt, hf_dir)
