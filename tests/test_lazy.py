"""Lazy Attention: exactness properties of method.md, the cache size, generate and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcache_jax import QCacheError
from qcache_jax.demo.hf_models import build_hf_llava
from lazy_reference import lazy_logits_reference
from tiny_models import converted, make_inputs

TOL = 1e-4
SCHEDULES = ["1", "1-3", "2,4-5", "1,3,5"]


@pytest.fixture(scope="module")
def lazy_pair(tmp_path_factory):
    """(HF model, converted model) with 6 layers, GQA, one image of 16 tokens."""
    hf = build_hf_llava(seed=21, num_layers=6)
    return hf, converted(hf, tmp_path_factory.mktemp("lazy"))


@pytest.mark.parametrize("mode", ["gla", "vla"])
@pytest.mark.parametrize("spec", SCHEDULES)
def test_lazy_logits_match_numpy_reference(lazy_pair, mode, spec, rng):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 2, 6, rng)
    lazy = qm.resolve_lazy(spec).lazy
    ref = lazy_logits_reference(hf, ids, pv, lazy, mode)
    out = qm.logits(ids, pv, lazy=spec, mode=mode)
    assert np.abs(out - ref).max() <= TOL
    # The lazy layers really change the output (the test could fail).
    assert np.abs(out - qm.logits(ids, pv)).max() > 1e-3
    if mode == "vla":  # and the superseded VLA formula would fail it
        old = lazy_logits_reference(hf, ids, pv, lazy, mode, first_reading=True)
        assert np.abs(old - ref).max() > 100 * TOL


def test_scanned_mask_equals_unrolled(lazy_pair, rng):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 2, 5, rng)
    for mode in ("gla", "vla"):
        a = qm.logits(ids, pv, lazy="2-4", mode=mode, loop="scan")
        b = qm.logits(ids, pv, lazy="2-4", mode=mode, loop="unroll")
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_empty_schedule_is_dense_and_hf(lazy_pair, rng):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 6, rng)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv)).logits.numpy()
    for lazy in (None, "none", [False] * 6):
        assert np.abs(qm.logits(ids, pv, lazy=lazy) - ref).max() <= TOL


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_zero_residual_construction_changes_nothing(tmp_path, rng, mode):
    """method.md property 4: anchor with zero residual and shared q/k weights -> lazy == dense."""
    hf = build_hf_llava(seed=22, num_layers=5)
    lm = hf.model.language_model
    with torch.no_grad():
        for anchor, lazy_layer in ((1, 2), (1, 3)):
            a, l = lm.layers[anchor], lm.layers[lazy_layer]
            a.self_attn.o_proj.weight.zero_()
            a.mlp.down_proj.weight.zero_()
            l.input_layernorm.weight.copy_(a.input_layernorm.weight)
            l.self_attn.q_proj.weight.copy_(a.self_attn.q_proj.weight)
            l.self_attn.k_proj.weight.copy_(a.self_attn.k_proj.weight)
        # layer 3's input equals layer 2's only if layer 2 adds nothing either
        lm.layers[2].self_attn.o_proj.weight.zero_()
        lm.layers[2].mlp.down_proj.weight.zero_()
    qm = converted(hf, tmp_path)
    ids, pv = make_inputs(hf.config, 2, 6, rng)
    np.testing.assert_allclose(qm.logits(ids, pv, lazy="2-3", mode=mode), qm.logits(ids, pv), atol=1e-5, rtol=0)


def _check_decode_vs_forward(qm, ids, pv, lazy, mode, **kw):
    res = qm.generate(
        input_ids=ids,
        pixel_values=pv,
        lazy=lazy,
        mode=mode,
        max_new_tokens=6,
        return_logits=True,
        eos_token_id=-1,
        **kw,
    )
    for row in range(ids.shape[0]):
        gen = res.token_ids[row]
        full = np.concatenate([ids[row], gen[:-1]])[None]
        row_pv = None if pv is None else pv[row : row + 1]
        ref = qm.logits(full, row_pv, lazy=lazy, mode=mode)[0, ids.shape[1] - 1 :]
        np.testing.assert_allclose(res.logits[row], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("loop", ["unroll", "scan"])
@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("1-2,4", "gla"), ("1-2,4", "vla"), ("1-5", "gla")])
def test_decode_equals_full_forward_every_position(lazy_pair, rng, lazy, mode, loop):
    """Prefill + decode through the layer stack, scanned or unrolled, equal the full forward."""
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 2, 5, rng)
    _check_decode_vs_forward(qm, ids, pv, lazy, mode, loop=loop)


@pytest.mark.parametrize("loop,reuse", [("unroll", True), ("scan", True), ("unroll", False)])
@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("1-2,4", "gla"), ("1-2,4", "vla")])
def test_single_prompt_decode_equals_full_forward(lazy_pair, rng, lazy, mode, loop, reuse):
    """One prompt in a two-row cache: the decode step computes the live row alone (Plan.live_rows)
    and still equals the full forward at every position, with an image."""
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    _check_decode_vs_forward(qm, ids, pv, lazy, mode, loop=loop, reuse_probs=reuse)


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_prob_reuse_equals_recompute(lazy_pair, rng, mode):
    """Decode: the anchor's handed-on probabilities (GLA: every segment; VLA: the visual one)
    times the lazy layer's V equal recomputing softmax(Q_b K_b^T) from the Q Cache."""
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 2, 5, rng)
    kw = dict(input_ids=ids, pixel_values=pv, lazy="1-3,5", mode=mode, max_new_tokens=5, return_logits=True,
              eos_token_id=-1)
    a = qm.generate(**kw)
    b = qm.generate(**kw, reuse_probs=False)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)


def test_decode_text_only_prompt(lazy_pair, rng):
    hf, qm = lazy_pair
    ids = rng.integers(5, 60, size=(1, 7))
    for lazy, mode in ((None, "vla"), ("2-4", "gla"), ("2-4", "vla")):
        _check_decode_vs_forward(qm, ids, None, lazy, mode)


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_kv_cache_bytes_formula(lazy_pair, rng, mode):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    res = qm.generate(input_ids=ids, pixel_values=pv, lazy="1-3,5", mode=mode, max_new_tokens=4)
    layout = qm.engine().plan([ids[0].tolist()], [1], schedule=qm.resolve_lazy("1-3,5", mode), max_new_tokens=4).layout
    n_lazy, n_layers = 4, 6
    ratio = res.kv_cache_bytes / res.dense_kv_cache_bytes
    share = 1.0 if mode == "gla" else layout.image_len / (layout.image_len + layout.text_len)
    assert ratio == pytest.approx(1 - n_lazy / (2 * n_layers) * share, abs=1e-12)
    assert 0 < layout.image_len and ratio < 1


@pytest.mark.parametrize("text_only", [False, True])
def test_dense_greedy_equals_hf_generate(lazy_pair, rng, text_only):
    hf, qm = lazy_pair
    if text_only:
        ids, pv = rng.integers(5, 60, size=(1, 9)), None
    else:
        ids, pv = make_inputs(hf.config, 1, 6, rng)
    kw = {"input_ids": torch.tensor(ids)}
    if pv is not None:
        kw["pixel_values"] = torch.tensor(pv)
    with torch.no_grad():
        ref = hf.generate(**kw, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=10, eos_token_id=-1)
    assert ours.token_ids[0] == ref[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("1-2,4", "gla"), ("1-2,4", "vla")])
def test_batch_equals_each_prompt_alone(lazy_pair, rng, lazy, mode):
    hf, qm = lazy_pair
    ids_img, pv = make_inputs(hf.config, 2, 7, rng)
    rows = [ids_img[0].tolist(), rng.integers(5, 60, size=4).tolist(), ids_img[1][:-3].tolist()]
    pvs = [pv[0:1], None, pv[1:2]]
    width = max(map(len, rows))
    batch = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for i, r in enumerate(rows):  # left padding, as HF batches for generation
        batch[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    together = qm.generate(
        input_ids=batch, attention_mask=mask, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=6, eos_token_id=-1
    )
    for i, r in enumerate(rows):
        alone = qm.generate(
            input_ids=np.array([r]), pixel_values=pvs[i], lazy=lazy, mode=mode, max_new_tokens=6, eos_token_id=-1
        )
        assert together.token_ids[i] == alone.token_ids[0]


def test_eos_stops_row_and_cache_full_stops(lazy_pair, rng):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    free = qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=8, eos_token_id=-1)
    eos = free.token_ids[0][2]
    stopped = qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=8, eos_token_id=eos)
    first = free.token_ids[0].index(eos)
    assert stopped.token_ids[0] == free.token_ids[0][: first + 1]
    # A cache of prompt + 2 slots: two generated tokens are fed back, the third fills no slot
    # (it comes from the last logits), and the row stops there.
    full = qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=8, eos_token_id=-1, cache_len=ids.shape[1] + 2)
    assert full.token_ids[0] == free.token_ids[0][:3]


def test_no_recompile_for_new_prompts_in_bucket(lazy_pair, rng):
    import jax

    hf, qm = lazy_pair
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
    )
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    qm.generate(input_ids=ids, pixel_values=pv, lazy="1-2", mode="gla", max_new_tokens=5)
    before = len(compiles)
    for n_text, new in ((6, 7), (9, 3)):
        ids, pv = make_inputs(hf.config, 1, n_text, rng)
        qm.generate(
            input_ids=ids, pixel_values=pv, lazy="1-2", mode="gla", max_new_tokens=new, temperature=0.7, seed=n_text
        )
    assert len(compiles) == before, f"recompiled: {compiles[before:]}"
    assert before > 0  # the listener does see compilations


def test_sampling_is_seeded_and_respects_top_k(lazy_pair, rng):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    a = qm.generate(
        input_ids=ids, pixel_values=pv, temperature=1.0, seed=3, max_new_tokens=8, eos_token_id=-1, return_logits=True
    )
    b = qm.generate(input_ids=ids, pixel_values=pv, temperature=1.0, seed=3, max_new_tokens=8, eos_token_id=-1)
    assert a.token_ids == b.token_ids
    k1 = qm.generate(
        input_ids=ids, pixel_values=pv, temperature=5.0, top_k=1, seed=4, max_new_tokens=8, eos_token_id=-1
    )
    greedy = qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=8, eos_token_id=-1)
    assert k1.token_ids == greedy.token_ids
    tiny_p = qm.generate(
        input_ids=ids, pixel_values=pv, temperature=5.0, top_p=1e-6, seed=4, max_new_tokens=8, eos_token_id=-1
    )
    assert tiny_p.token_ids == greedy.token_ids


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(lazy="0-2"), "layer 0 cannot be lazy"),
        (dict(lazy="3-9"), "out of range"),
        (dict(lazy=[False, True]), "has 2 entries"),
        (dict(lazy="2-x"), "bad lazy layer spec"),
        (dict(lazy="auto"), "no schedule.json"),
        (dict(mode="fast"), "unknown mode"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(cache_len=8), "does not fit the cache"),
    ],
)
def test_generate_bad_inputs(lazy_pair, rng, kwargs, needle):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    with pytest.raises(QCacheError, match=needle):
        qm.generate(input_ids=ids, pixel_values=pv, **kwargs)


def test_bad_images_and_tokens(lazy_pair, rng):
    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 5, rng)
    with pytest.raises(QCacheError, match=r"pixel_values must be \[N, 3, 28, 28\]"):
        qm.logits(ids, pv[:, :, :20])
    with pytest.raises(QCacheError, match="image tokens"):
        qm.logits(ids[:, 3:], pv)
    with pytest.raises(QCacheError, match="outside the vocabulary"):
        qm.logits(ids + 1000, pv)
    with pytest.raises(QCacheError, match="no pixel_values"):
        qm.generate(input_ids=ids)


def test_with_params_is_the_model_with_other_weights(lazy_pair, rng):
    """``with_params``: the same model with other weights (HF's, perturbed the same way), the
    original untouched; a tree of other shapes is refused."""
    import copy

    import jax

    hf, qm = lazy_pair
    ids, pv = make_inputs(hf.config, 1, 6, rng)
    before = qm.logits(ids, pv)
    scaled = jax.tree.map(lambda x: x * 1.01, qm.params)
    other = qm.with_params(scaled)
    hf_scaled = copy.deepcopy(hf)
    with torch.no_grad():
        for p in hf_scaled.parameters():
            p.mul_(1.01)
        ref = hf_scaled(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pv)).logits.numpy()
    assert np.abs(other.logits(ids, pv) - ref).max() <= TOL
    assert np.abs(other.logits(ids, pv) - before).max() > 10 * TOL  # it really changed
    assert np.array_equal(qm.logits(ids, pv), before)
    assert other.config is qm.config and other.path == qm.path
    bad = jax.tree.map(lambda x: x[..., :1] if x.ndim else x, qm.params)
    with pytest.raises(QCacheError, match="with_params"):
        qm.with_params(bad)
