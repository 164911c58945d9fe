"""`qcache prune`: a GLA checkpoint without its lazy layers' q_proj/k_proj, exact under its
schedule and refused under any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from qcache_jax import QCacheError, load
from qcache_jax.tools.prune import directory_bytes, prune

SPEC = "1-2"  # tiny_ckpt has 4 layers


@pytest.fixture(scope="module")
def pruned(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "ckpt"
    return prune(tiny_ckpt, out, lazy=SPEC, mode="gla")


def test_pruned_checkpoint_records_schedule_and_removed_weights(tiny_ckpt, pruned):
    out = pruned.out
    assert json.loads((out / "schedule.json").read_text())["lazy_layers"] == [1, 2]
    assert json.loads((out / "schedule.json").read_text())["mode"] == "gla"
    assert json.loads((out / "pruned.json").read_text())["layers"] == [1, 2]
    assert pruned.bytes_before == directory_bytes(tiny_ckpt) > pruned.bytes_after == directory_bytes(out)
    m, base = load(out), load(tiny_ckpt)
    assert m.pruned == [1, 2] and base.pruned == []
    for i in (1, 2):  # really gone: empty placeholders
        assert m.params["language_model"]["layers"][i]["self_attn"]["q_proj"]["kernel"].size == 0
    assert m.params["language_model"]["layers"][3]["self_attn"]["q_proj"]["kernel"].size > 0


def test_same_logits_and_tokens_under_its_schedule(tiny_ckpt, pruned, image_path, rng):
    m, base = load(pruned.out), load(tiny_ckpt)
    kw = dict(max_new_tokens=5, return_logits=True)
    a = m.generate("what color ?", [image_path], lazy="auto", **kw)
    b = base.generate("what color ?", [image_path], lazy=SPEC, mode="gla", **kw)
    assert a.token_ids == b.token_ids and a.lazy_layers == [1, 2] and a.mode == "gla"
    np.testing.assert_array_equal(np.concatenate(a.logits), np.concatenate(b.logits))
    ids = np.asarray([[t for t in a.prompt_token_ids[0] if t != base.config.image_token_id]])
    la = m.logits(ids, lazy="auto")
    lb = base.logits(ids, lazy=SPEC, mode="gla", loop="unroll")
    # logits of a pruned checkpoint run with the schedule fixed at trace time, the unpruned with a
    # traced mask (lax.cond): other XLA fusions, float32 rounding apart (generate is bit-identical)
    np.testing.assert_allclose(la, lb, atol=1e-5, rtol=0)
    # a GLA schedule with more lazy layers needs no removed weight either
    m.generate("hi", lazy="1-3", mode="gla", max_new_tokens=2)


@pytest.mark.parametrize("kw", [dict(lazy="none"), dict(lazy="1", mode="gla"), dict(lazy="1-2", mode="vla"),
                                dict(lazy="auto", fastv_layer=0, fastv_keep=0.5)])
def test_schedules_that_need_removed_weights_are_refused(pruned, kw):
    m = load(pruned.out)
    with pytest.raises(QCacheError) as e:
        m.generate("hi", max_new_tokens=2, **kw)
    assert "pruned" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QCacheError):
        m.logits(np.asarray([[1, 5, 6]]), **{k: v for k, v in kw.items()})
    if "fastv_layer" in kw:  # the line says what FastV does to the schedule, not "run --lazy auto"
        assert "FastV 0:0.5 makes layer 1 an anchor" in str(e.value)


def test_fastv_above_the_pruned_block_runs(pruned, image_path):
    """FastV after layer 2 cuts nothing in the pruned block 1-2: it runs on the pruned checkpoint."""
    res = load(pruned.out).generate("what color ?", [image_path], lazy="auto", fastv_layer=2, fastv_keep=0.5,
                                    max_new_tokens=2)
    assert res.lazy_layers == [1, 2] and res.fastv == "2:0.5"


def test_cli_prune_and_refusals(tiny_ckpt, pruned, tmp_path, capsys):
    out = tmp_path / "p"
    code, stdout, _ = run_cli(["prune", str(tiny_ckpt), str(out), "--lazy", "2-3"], capsys)
    assert code == 0 and "bytes" in stdout and "2-3 (gla)" in stdout
    cases = [
        (["prune", str(tiny_ckpt), str(out), "--lazy", "2-3"], "already exists"),
        (["prune", str(tiny_ckpt), str(tmp_path / "q"), "--lazy", "2-3", "--mode", "vla"], "VLA"),
        (["prune", str(tiny_ckpt), str(tmp_path / "q"), "--lazy", "none"], "nothing to prune"),
        (["prune", str(out), str(tmp_path / "q"), "--lazy", "2-3"], "pruned already"),
        (["generate", str(out), "--prompt", "hi", "--lazy", "none", "--quiet"], "pruned"),
        (["export", str(out), str(tmp_path / "hf")], "cannot be exported"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    assert not (tmp_path / "q").exists() and not (tmp_path / "hf").exists()
    code, _, _ = run_cli(["prune", str(tiny_ckpt), str(out), "--lazy", "1-3", "--force"], capsys)
    assert code == 0 and json.loads((out / "pruned.json").read_text())["layers"] == [1, 2, 3]
    code, stdout, _ = run_cli(["generate", str(out), "--prompt", "hi", "--lazy", "auto", "--max-new-tokens", "2"],
                              capsys)
    assert code == 0


def test_unpruned_checkpoint_stays_strict(tiny_ckpt, tmp_path):
    """A checkpoint whose params lack weights without a pruned.json is an error, as before."""
    import shutil

    from qcache_jax.io.checkpoint import load_params, read_config, save_checkpoint, without_projections

    cfg = read_config(tiny_ckpt)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    shutil.rmtree(bad / "params")
    (bad / "params_files.json").unlink()
    save_checkpoint(bad, cfg, without_projections(load_params(tiny_ckpt, cfg), [1]))
    with pytest.raises(QCacheError):
        load(bad)
