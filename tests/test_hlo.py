"""The decode loop moves no weights or caches: a structural check of the optimized HLO.

A decode step reads every layer's weights and KV cache; it must read them in place. Slicing a
layer out of stacked weights, or transposing a cache segment into another layout for the
attention, would copy them every step (docs/architecture.md). This compiles the real decode
loop of a small model on CPU and looks for any copy / transpose / convert / slice /
concatenate / pad as large as a cache segment or a weight matrix. Structural, not timed.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from hlo_check import large_moves

from qcache_jax.api import GenerateOptions, QCacheModel
from qcache_jax.demo.hf_models import tiny_config
from qcache_jax.nn.llava import Llava

from flax import nnx

CFG = tiny_config(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied-head"])
def model(request):
    cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, tie_word_embeddings=request.param))
    params = nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(0))))
    return QCacheModel(cfg, jax.device_put(params))


def _decode_hlo(model, lazy, mode, batch=2):
    per = CFG.image_tokens_per_image
    prompts = [[1] + [CFG.image_token_id] * per + [7, 8, 9]] * batch
    opts = GenerateOptions(lazy=lazy, mode=mode, max_new_tokens=16)
    engine, plan = model.plan(prompts, [1] * batch, opts)
    layout = plan.layout
    segment = layout.batch * CFG.text.num_kv_heads * min(layout.image_len, layout.text_len) * CFG.text.head_dim
    decoder = model.params["language_model"]["layers"]
    smallest_weight = min(int(np.prod(x.shape)) for x in jax.tree.leaves(decoder) if x.ndim == 2)
    return engine.decode_executable(plan).as_text(), min(segment, smallest_weight), plan


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("1-3", "gla"), ("2-3", "gla"), ("1-3", "vla")])
def test_decode_loop_has_no_weight_or_cache_copies(model, lazy, mode, batch):
    hlo, threshold, plan = _decode_hlo(model, lazy, mode, batch)
    # The biggest activation of a decode step is far below the threshold, so anything found is
    # a weight or a cache being moved.
    assert CFG.text.intermediate_size * plan.layout.batch < threshold
    assert "while" in hlo
    assert large_moves(hlo, threshold) == []


def test_the_check_sees_stacked_weight_slices():
    """Not vacuous: slicing layers out of stacked weights inside a loop shows up."""
    w = jax.ShapeDtypeStruct((4, 128, 256), np.float32)

    def loop(w, x):
        def body(i, x):
            for l in range(4):
                x = jax.numpy.tanh(x @ w[l] @ w[l].T)
            return x

        return jax.lax.fori_loop(0, 3, body, x)

    hlo = jax.jit(loop).lower(w, jax.ShapeDtypeStruct((2, 128), np.float32)).compile().as_text()
    assert large_moves(hlo, 128 * 256)


def test_single_prompt_decode_computes_one_row(model):
    """A single prompt sits in a two-row cache (batch_bucket), but its decode step multiplies
    the weights by its one live row: the projections and the MLP are [1, ...] products (XLA
    CPU's GEMV) and no [2, ...] one appears; attention still reads both cache rows."""
    hlo, _, plan = _decode_hlo(model, None, "vla", batch=1)
    assert plan.layout.batch == 2 and plan.live_rows == 1
    f = CFG.text.intermediate_size
    assert f"f32[1,{f}]" in hlo and f"f32[2,{f}]" not in hlo
    v = CFG.text.vocab_size
    assert f"f32[1,{v}]" in hlo  # the head too: one row of logits, padded afterwards
    _, _, plan3 = _decode_hlo(model, None, "vla", batch=3)
    assert plan3.live_rows is None  # 3 prompts in 4 rows: the prefill computes 4 rows too


def test_decode_kernels_counts_the_loop_body():
    """tools.bench.decode_kernels: the while body's kernels and those with a dot."""
    from qcache_jax.tools.bench import decode_kernels

    w = jax.ShapeDtypeStruct((64, 64), np.float32)

    def loop(w, x, n_dots):
        def body(i, x):
            for _ in range(n_dots):
                x = jax.numpy.tanh(x @ w)
            return x

        return jax.lax.fori_loop(0, 3, body, x)

    x = jax.ShapeDtypeStruct((2, 64), np.float32)
    counts = [decode_kernels(jax.jit(loop, static_argnums=2).lower(w, x, n).compile().as_text()) for n in (2, 5)]
    assert [c["matmuls"] for c in counts] == [2, 5]
    assert counts[1]["kernels"] > counts[0]["kernels"] >= 2
    # a conditional returning many arrays (XLA numbers long tuples' entries) is one kernel too
    def many(w, x):
        def body(i, xs):
            return jax.lax.cond(xs[0][0, 0] > 0, lambda: tuple(x * 2 for x in xs), lambda: tuple(x @ w for x in xs))

        return jax.lax.fori_loop(0, 3, body, tuple(x + k for k in range(7)))

    text = jax.jit(many).lower(w, x).compile().as_text()
    assert "/*index=" in text and decode_kernels(text)["kernels"] >= 1
    with pytest.raises(ValueError, match="no while loop"):
        decode_kernels(jax.jit(lambda w, x: x @ w).lower(w, x).compile().as_text())
