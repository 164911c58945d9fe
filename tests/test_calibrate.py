"""Calibration: divergences, schedule selection, the schedule JSON, data errors and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qcache_jax import QCacheError, convert_hf, load
from qcache_jax.tools.calibrate import (
    calibrate,
    js_divergence,
    kv_saving,
    load_samples,
    select_by_fraction,
    select_by_threshold,
)
from qcache_jax.cli import build_parser
from qcache_jax.demo.pictures import demo_image
from qcache_jax.lazy.schedule import SCHEDULE_FILE, Schedule
from qcache_jax.demo.hf_models import build_hf_llava, save_hf

# Layers built to copy their predecessor's attention exactly (zero-residual construction).
COPIES = (2, 3, 5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """A 6-layer model where layers 2, 3, 5 see their predecessor's input with its q/k weights.

    For each l in COPIES, layer l-1 adds nothing to the residual stream (o_proj, down_proj = 0),
    so layer l's input equals layer l-1's, and layer l takes layer l-1's norm and q/k weights:
    its attention pattern is layer l-1's (method.md, exactness property 4).
    """
    hf = build_hf_llava(seed=31, num_layers=6)
    layers = hf.model.language_model.layers
    with torch.no_grad():
        for l in COPIES:  # ascending, so 3 copies 2, which already copies 1
            prev, cur = layers[l - 1], layers[l]
            prev.self_attn.o_proj.weight.zero_()
            prev.mlp.down_proj.weight.zero_()
            cur.input_layernorm.weight.copy_(prev.input_layernorm.weight)
            cur.self_attn.q_proj.weight.copy_(prev.self_attn.q_proj.weight)
            cur.self_attn.k_proj.weight.copy_(prev.self_attn.k_proj.weight)
    d = tmp_path_factory.mktemp("calib")
    save_hf(hf, d / "hf", with_processor=True)
    convert_hf(d / "hf", d / "ckpt", progress=False)
    return load(d / "ckpt")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three generated images and two prompts: six samples."""
    d = tmp_path_factory.mktemp("images")
    for seed in range(3):
        demo_image(32, seed).save(d / f"img{seed}.png")
    (d / "prompts.txt").write_text("what is in the image ?\n\ndescribe the picture .\n")
    return d


@pytest.fixture(scope="module")
def jsonl(image_folder):
    p = image_folder / "data.jsonl"
    lines = [{"image": f"img{i}.png", "prompt": p} for i, p in enumerate(["what color ?", "where is the circle ?", "describe"])]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


@pytest.fixture(scope="module")
def calibrated(constructed, jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "schedule.json"
    return calibrate(constructed, jsonl, threshold=1e-4, out=out, progress=False)


def test_zero_residual_layers_have_zero_divergence_and_are_chosen(calibrated):
    res = calibrated
    assert res.samples == 3 and res.lazy_layers == list(COPIES)
    for mode in ("gla", "vla"):
        adjacent = np.array([res.divergence[mode].pairwise[:, l, l - 1].max() for l in range(1, 6)])
        copied = np.isin(np.arange(1, 6), COPIES)
        assert (adjacent[copied] < 1e-6).all(), (mode, adjacent)
        assert (adjacent[~copied] > 1e-3).all(), (mode, adjacent)  # the others really differ
    stats = res.per_layer()
    assert stats["anchor"] == [None, 0, 1, 1, 1, 4]  # layer 3 inherits from 1, across lazy layer 2
    assert stats["anchor_jsd_mean"][3] < 1e-6 and stats["adjacent_jsd_mean"][0] is None
    # The greedy fraction rule finds the same three zero-cost layers.
    assert select_by_fraction(res.divergence["vla"].pairwise.mean(0), 0.5) == res.schedule


def test_js_divergence_matches_scipy(rng):
    from scipy.spatial.distance import jensenshannon

    p = rng.dirichlet(np.ones(50), size=20)
    q = rng.dirichlet(np.full(50, 0.3), size=20)
    p[:5, :10] = 0  # zero entries, and disjoint supports below
    p[:5] /= p[:5].sum(-1, keepdims=True)
    q[5, :] = np.where(p[5] > np.median(p[5]), 0, 1)
    p[5] = np.where(q[5] > 0, 0, p[5])
    p[5] /= p[5].sum()
    q[5] /= q[5].sum()
    ours = np.asarray(js_divergence(p.astype(np.float32), q.astype(np.float32)))
    ref = jensenshannon(p, q, axis=-1, base=np.e) ** 2
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert ours[5] == pytest.approx(np.log(2), rel=1e-6)


def test_threshold_cuts_a_run_that_drifts_from_its_anchor():
    # Every adjacent step from layer 2 on is small, but layer 4 has drifted far from anchor 1.
    d = np.full((6, 6), 0.5)
    for l in range(2, 6):
        d[l, l - 1] = d[l - 1, l] = 0.01
    d[3, 1] = d[1, 3] = 0.02
    assert select_by_threshold(d, 0.05).lazy_layers == [2, 3, 5]
    assert select_by_threshold(d, 0.05, keep_first=3).lazy_layers == [3, 5]
    assert select_by_fraction(d, 0.34, keep_first=3, mode="gla") == Schedule.from_layers([3, 5], 6, "gla")
    with pytest.raises(QCacheError, match="only 3 of 6 may be lazy"):
        select_by_fraction(d, 0.9, keep_first=3)


def test_kv_saving_follows_the_cache_formula(constructed):
    cfg = constructed.config
    lazy = (False, True, True, False, True, False)
    img = cfg.image_tokens_per_image
    assert kv_saving(Schedule(lazy, "gla"), cfg)["fraction"] == pytest.approx(3 / 12)
    assert kv_saving(Schedule(lazy, "vla"), cfg)["fraction"] == pytest.approx(3 / 12 * img / (img + 128))


def test_schedule_json_round_trips_and_lazy_auto_uses_it(constructed, calibrated, tmp_path):
    data = json.loads(calibrated.schedule_path.read_text())
    cal = data["calibration"]
    assert data["lazy_layers"] == list(COPIES) and data["num_layers"] == 6 and cal["samples"] == 3
    assert cal["threshold"] == 1e-4 and data["mode"] == "vla" and "lazy_fraction" not in cal
    assert cal["per_layer"] == json.loads(json.dumps(calibrated.per_layer()))
    assert cal["checkpoint"] == str(constructed.path.resolve()) and cal["date"]
    assert Schedule.read(calibrated.schedule_path, 6) == calibrated.schedule
    # The file has the permissions the umask gives, not mkstemp's 0600.
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert calibrated.schedule_path.stat().st_mode & 0o777 == 0o666 & ~umask
    # Into the checkpoint, where --lazy auto looks.
    (constructed.path / SCHEDULE_FILE).write_text(calibrated.schedule_path.read_text())
    try:
        assert Schedule.resolve("auto", 6, ckpt_dir=constructed.path) == calibrated.schedule
        res = constructed.generate("what color ?", [demo_image(32, 0)], lazy="auto", max_new_tokens=2)
        assert res.lazy_layers == list(COPIES) and res.kv_cache_bytes < res.dense_kv_cache_bytes
    finally:
        (constructed.path / SCHEDULE_FILE).unlink()


def test_data_errors(image_folder, tmp_path):
    with pytest.raises(QCacheError, match="calibration data not found"):
        load_samples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(QCacheError, match="empty"):
        load_samples(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "prompt": "x"}\nnot json\n')
    with pytest.raises(QCacheError, match=r"bad.jsonl:2: not valid JSON"):
        load_samples(tmp_path / "bad.jsonl")
    (tmp_path / "keys.jsonl").write_text('{"img": "a.png"}\n')
    with pytest.raises(QCacheError, match=r"keys.jsonl:1: expected an object"):
        load_samples(tmp_path / "keys.jsonl")
    (tmp_path / "gone.jsonl").write_text('{"image": "nowhere.png", "prompt": "x"}\n')
    with pytest.raises(QCacheError, match=r"gone.jsonl:1: image .*nowhere.png not found"):
        load_samples(tmp_path / "gone.jsonl")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.jsonl").write_text('{"image": "broken.png", "prompt": "x"}\n')
    with pytest.raises(QCacheError, match=r"cannot read image .*broken.png"):
        load_samples(tmp_path / "broken.jsonl")
    with pytest.raises(QCacheError, match="no prompts.txt"):
        load_samples(tmp_path)
    folder = tmp_path / "no_images"
    folder.mkdir()
    (folder / "prompts.txt").write_text("hello\n")
    with pytest.raises(QCacheError, match="empty .*no .png"):
        load_samples(folder)
    samples = load_samples(image_folder)
    assert len(samples) == 6 and samples[1].prompt == "describe the picture ." and samples[1].image.name == "img0.png"
    assert len(load_samples(image_folder, max_samples=4)) == 4


def test_calibrate_errors_write_nothing(constructed, tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "s.json"
    with pytest.raises(QCacheError, match="cannot read image"):
        calibrate(constructed, tmp_path, out=out, plot=tmp_path / "s.png", progress=False)
    with pytest.raises(QCacheError, match="not both"):
        calibrate(constructed, tmp_path, threshold=0.1, lazy_fraction=0.5, out=out)
    with pytest.raises(QCacheError, match="unknown rows"):
        calibrate(constructed, tmp_path, rows="all", out=out)
    assert not out.exists() and not (tmp_path / "s.png").exists()


def test_cli_writes_schedule_and_plot(constructed, image_folder, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "sched" / "calib.json"
    args = parser.parse_args(
        ["calibrate", str(constructed.path), "--data", str(image_folder), "--lazy-fraction", "0.5", "--rows", "text",
         "--mode", "gla", "--max-samples", "2", "--out", str(out), "--quiet"]
    )
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    cal = data["calibration"]
    assert data["lazy_layers"] == list(COPIES) and data["mode"] == "gla" and cal["rows"] == "text"
    assert cal["lazy_fraction"] == 0.5 and cal["samples"] == 2
    png = out.with_suffix(".png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = capsys.readouterr().out
    assert "adjacent JSD" in text and "lazy layers 2-3,5 (gla) (3/6)" in text and f"wrote {png}" in text
    assert not (constructed.path / SCHEDULE_FILE).exists()  # --out, not the checkpoint
