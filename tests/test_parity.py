"""The Flax model reproduces Hugging Face transformers to float32 precision (logits max |diff| <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from qcache_jax import convert_hf, load
from qcache_jax.demo.hf_models import build_hf_llava
from tiny_models import hf_logits, layout_state_dict, make_inputs, write_state_dict

TOL = 1e-4

CASES = {
    "gqa-untied-default-rope": dict(),
    "mha-tied": dict(num_kv_heads=4, tie_word_embeddings=True),
    "mqa-explicit-head-dim": dict(num_kv_heads=1, head_dim=16),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "llama3-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        }
    ),
    "feature-layer-last-full": dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "feature-layer-0-and-list": dict(vision_feature_layer=[-3, -1]),
    "no-projector-bias-tanh-gelu": dict(multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh"),
    "attention-bias": dict(attention_bias=True),
    "mistral-backbone": dict(text_model_type="mistral"),
    "qwen2-backbone": dict(text_model_type="qwen2", tie_word_embeddings=True),
}


def _convert(model, tmp_path, *, layout="saved", fmt="safetensors", shard_bytes=None, dtype="float32"):
    src = tmp_path / "hf"
    model.save_pretrained(str(src))
    if layout != "saved" or fmt != "safetensors" or shard_bytes:
        write_state_dict(layout_state_dict(model, layout), src, fmt, shard_bytes=shard_bytes)
    out = tmp_path / "ckpt"
    convert_hf(src, out, dtype=dtype, progress=False)
    return load(out)


def _check(model, qm, rng, *, batch=2, loop="scan", mask=False, tol=TOL):
    ids, pv = make_inputs(model.config, batch, 7, rng)
    attn = None
    if mask:
        attn = np.ones_like(ids)
        attn[0, -2:] = 0  # right padding on row 0
    ref = hf_logits(model, ids, pv, attn)
    out = qm.logits(ids, pv, attention_mask=attn, loop=loop)
    keep = np.ones(ids.shape, bool) if attn is None else attn.astype(bool)
    err = np.abs(out - ref)[keep].max()
    assert err <= tol, f"max |logits - HF| = {err:.3g} > {tol}"
    return err


@pytest.mark.parametrize("name", sorted(CASES))
def test_configs_match_hf(name, tmp_path, rng):
    model = build_hf_llava(**CASES[name])
    qm = _convert(model, tmp_path)
    _check(model, qm, rng)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("loop", ["scan", "unroll"])
def test_batch_and_scan_or_unroll(batch, loop, tmp_path, rng):
    model = build_hf_llava(seed=1)
    _check(model, _convert(model, tmp_path), rng, batch=batch, loop=loop)


def test_scan_equals_unrolled(tmp_path, rng):
    model = build_hf_llava(seed=2)
    qm = _convert(model, tmp_path)
    ids, pv = make_inputs(model.config, 2, 5, rng)
    np.testing.assert_allclose(qm.logits(ids, pv), qm.logits(ids, pv, loop="unroll"), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["saved", "loaded", "hub"])
def test_key_layouts(layout, tmp_path, rng):
    model = build_hf_llava(seed=3)
    _check(model, _convert(model, tmp_path, layout=layout), rng)


def test_sharded_safetensors(tmp_path, rng):
    model = build_hf_llava(seed=4)
    src_files = tmp_path / "hf"
    qm = _convert(model, tmp_path, layout="hub", shard_bytes=40_000)
    assert len(list(src_files.glob("*.safetensors"))) > 2
    _check(model, qm, rng)


def test_pytorch_bin_checkpoint(tmp_path, rng):
    model = build_hf_llava(seed=5, tie_word_embeddings=True)
    _check(model, _convert(model, tmp_path, layout="hub", fmt="bin"), rng)


def test_text_only_and_padding_mask(tmp_path, rng):
    model = build_hf_llava(seed=6)
    qm = _convert(model, tmp_path)
    ids = rng.integers(5, model.config.text_config.vocab_size, size=(2, 9))
    ids[ids == model.config.image_token_index] = 5
    np.testing.assert_allclose(qm.logits(ids), hf_logits(model, ids), atol=TOL, rtol=0)
    _check(model, qm, rng, mask=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_conversion(dtype, tmp_path, rng):
    """Half-precision weights and activations. The tolerance is not a constant: it is what
    Hugging Face itself loses in the same dtype (the HF model cast to ``dtype``, against float32),
    so it follows the dtype and the logits' scale and cannot flake with package versions."""
    import torch

    model = build_hf_llava(seed=7)
    qm = _convert(model, tmp_path, dtype=dtype)
    leaves = [x.dtype.name for x in __import__("jax").tree.leaves(qm.params)]
    assert set(leaves) == {dtype}
    ids, pv = make_inputs(model.config, 2, 7, rng)
    ref = hf_logits(model, ids, pv)
    half = model.to(getattr(torch, dtype))
    with torch.no_grad():
        hf_half = half(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv).to(half.dtype)).logits.float().numpy()
    hf_err = np.abs(hf_half - ref).max()
    eps = float(np.finfo(np.float16).eps) if dtype == "float16" else 2.0**-7
    ours_err = np.abs(qm.logits(ids, pv) - ref).max()
    assert hf_err > 0  # the reference really ran in half precision
    assert ours_err <= 2 * hf_err + 4 * eps * np.abs(ref).max(), (ours_err, hf_err)