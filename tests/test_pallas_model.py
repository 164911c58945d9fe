"""The Pallas kernels inside the model, as far as a CPU can check them: logits and generate with
the GPU (Triton) and TPU (Mosaic) kernels run by their interpreters equal the XLA path, dense,
GLA and VLA. (Speed on a GPU/TPU is not measured here: no accelerator.)"""

from __future__ import annotations

import numpy as np
import pytest

from qcache_jax.demo.hf_models import build_hf_llava
from tiny_models import converted, make_inputs

IMPLS = ["pallas_gpu_interpret", "pallas_tpu_interpret"]
CASES = [(None, "vla"), ("1-2", "gla"), ("1-2", "vla")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = build_hf_llava(seed=41, num_layers=3)
    return hf, converted(hf, tmp_path_factory.mktemp("pallas"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lazy,mode", CASES)
def test_logits_with_pallas_kernels_equal_xla(model, impl, lazy, mode):
    hf, qm = model
    ids, pv = make_inputs(hf.config, 2, 5, np.random.default_rng(0))
    ref = qm.logits(ids, pv, lazy=lazy, mode=mode, attention_impl="xla")
    out = qm.logits(ids, pv, lazy=lazy, mode=mode, attention_impl=impl)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lazy,mode", CASES)
def test_generate_with_pallas_kernels_equals_xla(model, impl, lazy, mode):
    hf, qm = model
    ids, pv = make_inputs(hf.config, 2, 5, np.random.default_rng(1))
    kw = dict(input_ids=ids, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=4, eos_token_id=-1,
              return_logits=True)
    ref = qm.generate(**kw, attention_impl="xla")
    out = qm.generate(**kw, attention_impl=impl)
    assert out.token_ids == ref.token_ids
    for a, b in zip(out.logits, ref.logits):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
