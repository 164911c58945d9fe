"""FastV on top of Lazy Attention: the kept set and logits against an independent numpy
reference, decode against the full forward, the real cache sizes, the options' errors."""

from __future__ import annotations

import numpy as np
import pytest

from qcache_jax import QCacheError
from qcache_jax.demo.hf_models import build_hf_llava
from lazy_reference import lazy_logits_reference
from tiny_models import converted, make_inputs

TOL = 1e-4
K, R = 2, 0.5
# dense; lazy blocks below and above K; blocks straddling K (1-3: layer 3 becomes an anchor)
CASES = [(None, "vla"), ("1-3,5", "gla"), ("1-3,5", "vla"), ("1,4-5", "gla"), ("2-4", "vla")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF model, converted model): 6 layers, GQA, one image of 16 tokens."""
    hf = build_hf_llava(seed=21, num_layers=6)
    return hf, converted(hf, tmp_path_factory.mktemp("fastv"))


def _inputs(hf, rng, batch=2, n_text=5):
    return make_inputs(hf.config, batch, n_text, rng)


@pytest.mark.parametrize("lazy,mode", CASES)
def test_kept_set_and_logits_match_numpy_reference(pair, rng, lazy, mode):
    hf, qm = pair
    ids, pv = _inputs(hf, rng)
    kw = dict(lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=R)
    kept = qm.logits(ids, pv, **kw, fastv_kept=True)
    ref_kept = []
    ref = lazy_logits_reference(hf, ids, pv, qm.resolve_lazy(lazy).lazy, mode, fastv=(K, R), kept_out=ref_kept)
    np.testing.assert_array_equal(kept, ref_kept[0])
    assert (kept.sum(1) == 8).all()  # ceil(0.5 * 16)
    out = qm.logits(ids, pv, **kw)
    text = ids != hf.config.image_token_index  # the dropped positions' own logits are not FastV's
    assert np.abs(out - ref)[text].max() <= TOL
    # pruning really changes the output, so the test could fail
    assert np.abs(out - qm.logits(ids, pv, lazy=lazy, mode=mode))[text].max() > 1e-3
    for loop in ("unroll",):
        np.testing.assert_allclose(qm.logits(ids, pv, **kw, loop=loop)[text], out[text], atol=1e-5, rtol=0)


def test_keep_one_is_no_fastv(pair, rng):
    hf, qm = pair
    ids, pv = _inputs(hf, rng)
    for lazy, mode in (("1-3,5", "gla"), ("2-4", "vla")):
        a = qm.logits(ids, pv, lazy=lazy, mode=mode)
        b = qm.logits(ids, pv, lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=1.0)
        np.testing.assert_array_equal(a, b)
        kw = dict(input_ids=ids, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=4, return_logits=True)
        ga, gb = qm.generate(**kw), qm.generate(**kw, fastv_layer=K, fastv_keep=1.0)
        assert ga.token_ids == gb.token_ids and ga.kv_cache_bytes == gb.kv_cache_bytes and gb.fastv is None
        np.testing.assert_array_equal(np.concatenate(ga.logits), np.concatenate(gb.logits))


def _decode_vs_forward(qm, hf, ids, pv, lazy, mode, **kw):
    res = qm.generate(input_ids=ids, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=6, return_logits=True,
                      eos_token_id=-1, fastv_layer=K, fastv_keep=R, **kw)
    for row in range(ids.shape[0]):
        gen = res.token_ids[row]
        full = np.concatenate([ids[row], gen[:-1]])[None]
        # the full forward ranks with the last *prompt* token, as prefill does
        ref = qm.logits(full, pv[row : row + 1], lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=R,
                        fastv_row=ids.shape[1] - 1)[0, ids.shape[1] - 1 :]
        np.testing.assert_allclose(res.logits[row], ref, atol=TOL, rtol=0)
    return res


@pytest.mark.parametrize("lazy,mode", CASES)
def test_decode_equals_full_forward_every_position(pair, lazy, mode):
    hf, qm = pair
    rng = np.random.default_rng(7)  # a prompt whose greedy tokens are no image token
    ids, pv = _inputs(hf, rng)
    res = _decode_vs_forward(qm, hf, ids, pv, lazy, mode)
    if lazy == "1-3,5":  # the block 1-3 straddles K = 2: layer 3 is an anchor
        assert res.lazy_layers == [1, 2, 5] and res.fastv == "2:0.5"


def test_decode_scanned_loop_and_no_prob_reuse(pair):
    hf, qm = pair
    ids, pv = _inputs(hf, np.random.default_rng(7))
    _decode_vs_forward(qm, hf, ids, pv, "1-3,5", "vla", loop="scan")
    _decode_vs_forward(qm, hf, ids, pv, "1,4-5", "gla", reuse_probs=False)


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_kv_cache_bytes_are_the_array_sizes(pair, rng, mode):
    from qcache_jax.lazy.cache import init_state

    hf, qm = pair
    ids, pv = _inputs(hf, rng, batch=1)
    lazy = "1,4-5"
    res = qm.generate(input_ids=ids, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=4, fastv_layer=K,
                      fastv_keep=R)
    base = qm.generate(input_ids=ids, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=4)
    engine, plan = qm.plan([ids[0].tolist()], [1], qm.options(lazy=lazy, mode=mode, max_new_tokens=4,
                                                               fastv_layer=K, fastv_keep=R))
    layout = plan.layout
    state = init_state(layout, qm.config.text, engine.dtype)
    s_img, kept = layout.image_len, layout.fastv.kept(layout.image_len)
    assert s_img == 16 and kept == 8
    for i, layer in enumerate(state.layers):
        want = s_img if i <= K else kept
        assert layer.v_img.shape[2] == want and (layer.k_img is None or layer.k_img.shape[2] == want)
    real = sum(x.nbytes for layer in state.layers for x in (layer.k_img, layer.k_txt, layer.v_img, layer.v_txt)
               if x is not None)
    assert res.kv_cache_bytes == real
    # the saving over the same schedule: (S_img - kept) entries of each visual array above K
    b, hkv, d = layout.batch, qm.config.text.num_kv_heads, qm.config.text.head_dim
    per_entry = b * hkv * d * np.dtype(engine.dtype).itemsize
    arrays = sum(1 + layout.schedule.stores_k(i)[0] for i in range(K + 1, qm.num_layers))
    assert base.kv_cache_bytes - res.kv_cache_bytes == arrays * (s_img - kept) * per_entry
    assert res.dense_kv_cache_bytes == base.dense_kv_cache_bytes


@pytest.mark.parametrize("kw,needle", [
    (dict(fastv_layer=5), "out of range"),
    (dict(fastv_layer=-1), "out of range"),
    (dict(fastv_layer="2"), "integer"),
    (dict(fastv_layer=2, fastv_keep=0.0), "(0, 1]"),
    (dict(fastv_layer=2, fastv_keep=1.5), "(0, 1]"),
])
def test_bad_options_one_line(pair, rng, kw, needle):
    hf, qm = pair
    ids, pv = _inputs(hf, rng, batch=1)
    for call in (lambda: qm.logits(ids, pv, **kw), lambda: qm.generate(input_ids=ids, pixel_values=pv, **kw)):
        with pytest.raises(QCacheError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_no_recompile_for_new_prompts_in_bucket(pair, rng):
    import jax

    hf, qm = pair
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
    )
    kw = dict(lazy="1-3", mode="gla", fastv_layer=K, fastv_keep=R)
    ids, pv = _inputs(hf, rng, batch=1)
    qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=5, **kw)
    qm.logits(ids, pv, **kw)
    before = len(compiles)
    for n_text, new in ((6, 7), (4, 3)):
        ids, pv = _inputs(hf, rng, batch=1, n_text=n_text)
        qm.generate(input_ids=ids, pixel_values=pv, max_new_tokens=new, temperature=0.7, seed=n_text, **kw)
    ids, pv = _inputs(hf, rng, batch=1)
    qm.logits(ids, pv, **kw)
    assert len(compiles) == before, f"recompiled: {compiles[before:]}"
    assert before > 0


def test_cli_generate_fastv(tiny_ckpt, image_path, capsys):
    import json

    from conftest import run_cli
    from qcache_jax import load

    argv = ["generate", str(tiny_ckpt), "--prompt", "what color ?", "--image", str(image_path), "--lazy", "1-2",
            "--mode", "gla", "--max-new-tokens", "4", "--fastv", "1:0.5"]
    code, out, _ = run_cli(argv + ["--json"], capsys)
    data = json.loads(out)
    ref = load(tiny_ckpt).generate("what color ?", [image_path], lazy="1-2", mode="gla", max_new_tokens=4,
                                   fastv_layer=1, fastv_keep=0.5)
    assert code == 0 and data["token_ids"] == ref.token_ids[0] and data["fastv"] == "1:0.5"
    assert data["lazy_layers"] == [1] and data["kv_cache_bytes"] == ref.kv_cache_bytes  # layer 2 cut: an anchor
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "FastV 1:0.5" in out.splitlines()[-1]


@pytest.mark.parametrize("command", ["generate", "eval", "bench", "serve"])
@pytest.mark.parametrize("spec", ["3:0.5", "1:0", "x", "1:1.5"])
def test_cli_bad_fastv_is_one_line(tiny_ckpt, image_path, capsys, command, spec):
    from conftest import run_cli

    extra = {"generate": ["--prompt", "hi"], "eval": ["--data", "missing.jsonl"], "bench": [], "serve": []}[command]
    code, out, err = run_cli([command, str(tiny_ckpt), *extra, "--fastv", spec], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"qcache {command}: error:"), err
    assert "fastv" in lines[0].lower(), err  # the line names the bad option, not some later problem


def test_fastv_row_is_checked(pair, rng):
    hf, qm = pair
    ids, pv = _inputs(hf, rng)
    t = np.shape(ids)[1]
    for bad, needle in ((t, "fastv_row"), (-1, "fastv_row"), ([1, 2, 3], "one per row"), (1.5, "fastv_row")):
        with pytest.raises(QCacheError, match=needle):
            qm.logits(ids, pv, fastv_layer=1, fastv_keep=0.5, fastv_row=bad)
    with pytest.raises(QCacheError, match="without fastv_layer"):
        qm.logits(ids, pv, fastv_row=0)


@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("1-3,5", "gla"), ("2-4", "vla")])
def test_answer_logits_with_fastv_are_the_model_logits(pair, rng, lazy, mode):
    """Teacher-forced scoring with FastV (benchmarks.retention's FastV rows): the visual tokens
    ranked by the last prompt token (the first scored position) and the logits at the scored
    positions equal ``logits(..., fastv_row=...)`` of the whole sequence."""
    import jax.numpy as jnp

    from qcache_jax.tools.scoring import answer_logits

    hf, qm = pair
    ids, pv = _inputs(hf, rng, n_text=7)
    t = ids.shape[1]
    fastv = qm.resolve_fastv(K, R)
    schedule = qm.effective_schedule(lazy, mode, fastv)
    ans = np.broadcast_to(np.arange(t - 4, t - 1), (ids.shape[0], 1, 3)).astype(np.int32)
    # a one-slot packed row (benchmarks.retention's layout): the prefix is segment 0, the question 1
    n_prefix = int(np.max(np.nonzero(ids[0] == hf.config.image_token_index)[0])) + 1
    segments = np.concatenate([np.zeros(n_prefix), np.ones(t - n_prefix)]).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "pixel_values": jnp.asarray(pv), "ans_pos": jnp.asarray(ans),
             "positions": jnp.arange(t, dtype=jnp.int32), "segments": jnp.asarray(segments)}
    lz = None if schedule.is_dense else jnp.asarray(schedule.mask)
    got = np.asarray(answer_logits(qm.graphdef, qm.params, batch, lz, mode=mode, impl="xla", fastv=fastv))[:, 0]
    ref = qm.logits(ids, pv, lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=R, fastv_row=t - 4)[:, t - 4 : t - 1]
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    # ranked by another row, the kept set and the logits change: the row is really the last prompt token
    other = qm.logits(ids, pv, lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=R)[:, t - 4 : t - 1]
    assert np.abs(other - ref).max() > 1e-4
    with pytest.raises(ValueError, match="one question per row"):
        answer_logits(qm.graphdef, qm.params, dict(batch, ans_pos=jnp.concatenate([batch["ans_pos"]] * 2, 1)), lz,
                      mode=mode, impl="xla", fastv=fastv)
