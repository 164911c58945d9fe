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


def test_single_prompt_decode(pair):
    """One prompt: its decode step computes the live row of a two-row cache (Plan.live_rows)."""
    hf, qm = pair
    ids, pv = _inputs(hf, np.random.default_rng(7), batch=1)
    for lazy, mode, kw in (("1-3,5", "gla", {}), ("1-3,5", "vla", dict(loop="scan")),
                           ("1,4-5", "gla", dict(reuse_probs=False))):
        _decode_vs_forward(qm, hf, ids, pv, lazy, mode, **kw)


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


# -- padded batches, a text-only row beside an image row, two images, small and exact fractions ----
# (one schedule per test: every new shape or FastV fraction is a compilation of a few seconds)

LZ, MD = "1-3,5", "vla"  # the block 1-3 straddles K = 2: FastV runs "1-2,5"


def _ref(hf, qm, ids, pv, lazy, mode, keep=R):
    """The numpy reference of unpadded rows ``ids`` [B, n]: (logits [B, n, V], kept [B, n] bool);
    ``keep`` None: without FastV (and without its cut)."""
    kept = []
    fastv = None if keep is None else (K, keep)
    out = lazy_logits_reference(hf, np.asarray(ids), pv, qm.resolve_lazy(lazy).lazy, mode, fastv=fastv, kept_out=kept)
    return out, (kept[0] if kept else None)


def _decode_rows_vs_forward(qm, res, prompts, pvs, lazy, mode, keep=R):
    """Every row of ``res`` (greedy, FastV K:keep): each decode step's logits equal the full
    forward of that row's unpadded prompt + generated tokens, ranked by its last prompt token."""
    for row, (prompt, pv) in enumerate(zip(prompts, pvs)):
        gen, n = res.token_ids[row], len(prompt)
        assert res.prompt_token_ids[row] == list(prompt)
        assert qm.config.image_token_id not in gen, "a generated image token would be visual in the full forward"
        full = np.array(list(prompt) + list(gen[:-1]))[None]
        ref = qm.logits(full, pv, lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=keep, fastv_row=n - 1)[0, n - 1 :]
        assert len(res.logits[row]) == len(gen) == 6
        np.testing.assert_allclose(res.logits[row], ref, atol=TOL, rtol=0)


def _pad(qm, rows, side):
    """Token lists padded to one length on ``side``: (input_ids [B, T], attention_mask, offsets)."""
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), qm.pad_id(), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    offsets = [t - len(r) if side == "left" else 0 for r in rows]
    for i, (r, o) in enumerate(zip(rows, offsets)):
        ids[i, o : o + len(r)], mask[i, o : o + len(r)] = r, 1
    return ids, mask, offsets


def _unequal_rows(hf, rng, n_texts):
    """One-image rows of 16 + ``n_text`` tokens: (token lists, pixel values per row [1, C, H, W])."""
    rows, pvs = [], []
    for n_text in n_texts:
        ids, pv = make_inputs(hf.config, 1, n_text, rng)
        rows.append(ids[0].tolist())
        pvs.append(pv)
    return rows, pvs


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_unequal_prompts_match_reference_per_row(pair, rng, side):
    """Rows of 19 and 23 tokens padded on either side: per row the kept set and the non-visual
    logits at the real positions are the reference's of the unpadded row. The selector is each
    row's last real token by default, and the same when given per row (``fastv_row`` [B])."""
    hf, qm = pair
    rows, pvs = _unequal_rows(hf, rng, (3, 7))
    ids, mask, offsets = _pad(qm, rows, side)
    pv = np.concatenate(pvs)
    kw = dict(lazy=LZ, mode=MD, fastv_layer=K, fastv_keep=R)
    kept = qm.logits(ids, pv, mask, **kw, fastv_kept=True)
    out = qm.logits(ids, pv, mask, **kw)
    last = np.array([o + len(r) - 1 for o, r in zip(offsets, rows)])
    np.testing.assert_array_equal(qm.logits(ids, pv, mask, **kw, fastv_row=last, fastv_kept=True), kept)
    for i, (row, o) in enumerate(zip(rows, offsets)):
        real = slice(o, o + len(row))
        ref, ref_kept = _ref(hf, qm, [row], pvs[i], LZ, MD)
        np.testing.assert_array_equal(kept[i, real], ref_kept[0])
        assert kept[i].sum() == 8 and ref_kept.sum() == 8  # so no pad position is kept
        text = np.asarray(row) != hf.config.image_token_index
        assert np.isfinite(out[i, real]).all()
        assert np.abs(out[i, real] - ref[0])[text].max() <= TOL
        plain, _ = _ref(hf, qm, [row], pvs[i], LZ, MD, keep=None)
        assert np.abs(ref[0] - plain[0])[text].max() > 1e-3  # pruning changes this row: the test could fail
    if side == "right":  # ranked by the batch's last position, a pad of the short row: another kept set there
        other = qm.logits(ids, pv, mask, **kw, fastv_row=ids.shape[1] - 1, fastv_kept=True)
        assert (other[0] != kept[0]).any() and (other[1] == kept[1]).all()


def test_padded_decode_equals_full_forward_every_position(pair):
    """generate on unequal prompts (19 and 21 tokens) padded left or right (the same rows): each
    row's decode equals the full forward of its own unpadded sequence."""
    hf, qm = pair
    rows, pvs = _unequal_rows(hf, np.random.default_rng(7), (3, 5))
    kw = dict(pixel_values=np.concatenate(pvs), lazy=LZ, mode=MD, max_new_tokens=6, return_logits=True,
              eos_token_id=-1, fastv_layer=K, fastv_keep=R)
    left, right = (qm.generate(input_ids=ids, attention_mask=mask, **kw)
                   for ids, mask, _ in (_pad(qm, rows, "left"), _pad(qm, rows, "right")))
    assert left.token_ids == right.token_ids and left.kv_cache_bytes == right.kv_cache_bytes
    for a, b in zip(left.logits, right.logits):
        np.testing.assert_array_equal(a, b)
    _decode_rows_vs_forward(qm, left, rows, pvs, LZ, MD)


def _mixed_batch(hf, rng):
    """A text-only row (no image token) and a one-image row, 21 tokens each: ids [2, 21], pv [1, ...]."""
    img_ids, pv = make_inputs(hf.config, 1, 5, rng)
    text = rng.integers(3, hf.config.text_config.vocab_size, size=img_ids.shape[1])
    text[text == hf.config.image_token_index] = 5
    return np.stack([text, img_ids[0]]), pv


def test_text_only_row_beside_an_image_row(pair, rng):
    """A text-only row first, an image row second: FastV keeps nothing of the text-only row and
    its logits are the no-FastV logits of the schedule FastV runs (cut at K: "1-2,5"; GLA, where
    the cut changes a text-only row: a VLA lazy layer is exact on text keys); the image row's
    kept set and logits are the reference's."""
    hf, qm = pair
    ids, pv = _mixed_batch(hf, rng)
    kw = dict(lazy=LZ, mode="gla", fastv_layer=K, fastv_keep=R)
    assert qm.effective_schedule(LZ, "gla", qm.resolve_fastv(K, R)).lazy_layers == [1, 2, 5]
    kept = qm.logits(ids, pv, **kw, fastv_kept=True)
    out = qm.logits(ids, pv, **kw)
    cut, uncut = qm.logits(ids, pv, lazy="1-2,5", mode="gla"), qm.logits(ids, pv, lazy=LZ, mode="gla")
    ref, ref_kept = _ref(hf, qm, ids, pv, LZ, "gla")
    assert not kept[0].any() and not ref_kept[0].any()
    np.testing.assert_allclose(out[0], cut[0], atol=1e-5, rtol=0)
    assert np.abs(out[0] - ref[0]).max() <= TOL
    assert np.abs(out[0] - uncut[0]).max() > 1e-3  # the cut is real: "no FastV" means the cut schedule
    np.testing.assert_array_equal(kept[1], ref_kept[1])
    assert kept[1].sum() == 8
    text = ids[1] != hf.config.image_token_index
    assert np.abs(out[1] - ref[1])[text].max() <= TOL
    assert np.abs(out[1] - cut[1])[text].max() > 1e-3  # the image row was pruned


def test_text_only_row_beside_an_image_row_decode(pair):
    """generate on the mixed batch: each row's decode equals its full forward with FastV, and
    the text-only row's also equals the no-FastV full forward of the cut schedule."""
    hf, qm = pair
    ids, pv = _mixed_batch(hf, np.random.default_rng(8))  # greedy tokens: no image token
    res = qm.generate(input_ids=ids, pixel_values=pv, lazy=LZ, mode="gla", max_new_tokens=6, return_logits=True,
                      eos_token_id=-1, fastv_layer=K, fastv_keep=R)
    assert res.fastv == f"{K}:{R}" and res.lazy_layers == [1, 2, 5]
    _decode_rows_vs_forward(qm, res, ids.tolist(), [None, pv], LZ, "gla")
    full = np.array(ids[0].tolist() + res.token_ids[0][:-1])[None]
    plain = qm.logits(full, None, lazy="1-2,5", mode="gla")[0, ids.shape[1] - 1 :]
    np.testing.assert_allclose(res.logits[0], plain, atol=TOL, rtol=0)


def test_two_images_in_one_prompt(pair):
    """Two images per row (32 visual tokens): kept(32) = 16 ranked over both images together
    (a row keeps 7 of one image and 9 of the other, not 8 + 8); the kept set and logits are the
    reference's; decode equals the full forward."""
    hf, qm = pair
    ids, pv = make_inputs(hf.config, 2, 5, np.random.default_rng(7), images_per_row=2)
    assert ids.shape == (2, 37) and pv.shape[0] == 4
    text = ids != hf.config.image_token_index
    kw = dict(lazy=LZ, mode=MD, fastv_layer=K, fastv_keep=R)
    kept = qm.logits(ids, pv, **kw, fastv_kept=True)
    ref, ref_kept = _ref(hf, qm, ids, pv, LZ, MD)
    np.testing.assert_array_equal(kept, ref_kept)
    assert (kept.sum(1) == 16).all() and (kept[:, 2:18].sum(1) != 8).any()  # images at 2-17 and 18-33
    out = qm.logits(ids, pv, **kw)
    assert np.abs(out - ref)[text].max() <= TOL
    plain, _ = _ref(hf, qm, ids, pv, LZ, MD, keep=None)
    assert np.abs(ref - plain)[text].max() > 1e-3
    res = qm.generate(input_ids=ids, pixel_values=pv, lazy=LZ, mode=MD, max_new_tokens=6, return_logits=True,
                      eos_token_id=-1, fastv_layer=K, fastv_keep=R)
    _decode_rows_vs_forward(qm, res, ids.tolist(), [pv[0:2], pv[2:4]], LZ, MD)


@pytest.mark.parametrize("keep,want", [(0.01, 1), (0.375, 6)])
def test_small_and_exact_keep_fractions(pair, rng, keep, want):
    """R = 0.01 keeps one visual token of 16 (ceil(0.16)); R = 0.375 keeps exactly 6 of 16
    (0.375 * 16 is exactly 6, no rounding up): kept set and logits as the reference's."""
    hf, qm = pair
    ids, pv = _inputs(hf, rng)
    kw = dict(lazy=LZ, mode=MD, fastv_layer=K, fastv_keep=keep)
    kept = qm.logits(ids, pv, **kw, fastv_kept=True)
    ref, ref_kept = _ref(hf, qm, ids, pv, LZ, MD, keep=keep)
    np.testing.assert_array_equal(kept, ref_kept)
    assert (kept.sum(1) == want).all()
    text = ids != hf.config.image_token_index
    assert np.abs(qm.logits(ids, pv, **kw) - ref)[text].max() <= TOL


def test_decode_keeps_one_visual_token(pair):
    """R = 0.01 (GLA, no cut): the layers above K cache and attend one visual entry per row;
    decode equals the full forward."""
    hf, qm = pair
    ids, pv = _inputs(hf, np.random.default_rng(7))
    lazy, mode = "1,4-5", "gla"
    _, plan = qm.plan([ids[0].tolist()], [1], qm.options(lazy=lazy, mode=mode, fastv_layer=K, fastv_keep=0.01))
    assert plan.layout.image_len == 16 and plan.layout.fastv.kept(plan.layout.image_len) == 1
    res = qm.generate(input_ids=ids, pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=6, return_logits=True,
                      eos_token_id=-1, fastv_layer=K, fastv_keep=0.01)
    _decode_rows_vs_forward(qm, res, ids.tolist(), [pv[0:1], pv[1:2]], lazy, mode, keep=0.01)


def test_kept_is_the_exact_ceil():
    """kept(n) is ceil(R * n) of the decimal R exactly (at least 1 of n >= 1), also where the
    float product overshoots the integer (0.07 * 100 = 7.000000000000001), in Python and in
    the traced lookup table."""
    import math
    from fractions import Fraction

    from qcache_jax.lazy.fastv import FastV

    assert 0.07 * 100 > 7 and 0.28 * 25 > 7 and 0.56 * 75 > 42  # the float traps exist
    for s in ("1e-12", "0.01", "0.07", "0.2", "0.28", "0.3", "0.375", "0.5", "0.56", "0.7", "0.99"):
        fv = FastV(1, float(s))
        want = [0] + [max(1, math.ceil(Fraction(s) * n)) for n in range(1, 129)]
        assert [fv.kept(n) for n in range(129)] == want, s
        assert np.asarray(fv.kept_counts(np.arange(129), 128)).tolist() == want, s
