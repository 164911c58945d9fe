"""Smoke tests of the benchmark library, `qcache bench` and the BENCHMARKS.md renderer.

Tiny sizes only; these check fields and their consistency, never timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from qcache_jax.tools import bench
from qcache_jax.errors import QCacheError

ROOT = Path(__file__).resolve().parents[1]


def test_presets_have_realistic_shapes():
    cfg = bench.preset_config("llava-1.5-7b")
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.head_dim, t.vocab_size) == (4096, 11008, 32, 32, 128, 32064)
    assert cfg.image_tokens_per_image == 576
    assert bench.preset_config("llava-1.5-7b", num_layers=8).text.num_layers == 8
    from qcache_jax.nn.llava import abstract_model

    n, _ = bench.count_params(abstract_params(bench.preset_config("cpu-300m"))[1])
    assert 250e6 < n < 350e6
    assert bench.preset_config("cpu-300m").image_tokens_per_image == 576
    with pytest.raises(QCacheError):
        bench.preset_config("gpt-5")


@pytest.mark.parametrize("layers", [4, 16, 32])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.7])
def test_lazy_schedule(layers, fraction):
    s = bench.lazy_schedule(layers, fraction)
    assert len(s) == layers and not s[0]
    assert sum(s) == min(round(fraction * layers), layers - 1)


def test_make_inputs_and_errors():
    cfg = bench.preset_config("tiny")
    per = cfg.image_tokens_per_image
    ids, pv = bench.make_inputs(cfg, batch=3, prompt_tokens=5, image_tokens=2 * per)
    assert ids.shape == (3, 1 + 2 * per + 5)
    assert (ids == cfg.image_token_id).sum() == 3 * 2 * per and pv.shape[0] == 6
    ids, pv = bench.make_inputs(cfg, batch=1, prompt_tokens=5, image_tokens=0)
    assert pv is None and (ids != cfg.image_token_id).all()
    with pytest.raises(QCacheError, match="multiple"):
        bench.make_inputs(cfg, batch=1, prompt_tokens=5, image_tokens=per + 1)


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_max_batch_from_cache_shapes(mode):
    cfg = bench.preset_config("llava-1.5-7b", dtype="float16")
    L = cfg.text.num_layers
    sched = bench.lazy_schedule(L, 0.5)
    per, dense_per = bench.kv_bytes_per_row(cfg, image_tokens=576, text_tokens=128, lazy=sched, mode=mode)
    assert dense_per == 2 * L * (576 + 128) * 32 * 128 * 2
    saved = sum(sched) / (2 * L) * (1.0 if mode == "gla" else 576 / (576 + 128))
    assert per / dense_per == pytest.approx(1 - saved)
    m = bench.max_batch(cfg, 80 * 2**30, image_tokens=576, text_tokens=128, lazy=sched, mode=mode)
    d = bench.max_batch(cfg, 80 * 2**30, image_tokens=576, text_tokens=128, lazy=(False,) * L, mode=mode)
    assert m["rows"] >= d["rows"] > 0
    assert m["weights_bytes"] + m["rows"] * m["kv_bytes_per_row"] <= 80 * 2**30 < m["weights_bytes"] + (m["rows"] + 1) * m["kv_bytes_per_row"]
    assert m["engine_batch"] <= m["rows"] < 2 * m["engine_batch"]


def test_capacity_helpers():
    cfg = bench.preset_config("cpu-300m")
    assert bench.image_capacity(cfg, 2880) == 8 * 576  # 5 images -> bucket of 8
    assert bench.image_capacity(cfg, 1152) == 1152 and bench.image_capacity(cfg, 0) == 0
    assert bench.bucket_text(32, 16) == 64 + 16


@pytest.fixture(scope="module")
def tiny2():
    """The model `qcache bench random:tiny:2` uses (cached there with its executables)."""
    from qcache_jax.bench_cli import bench_config

    return bench_config("random:tiny:2")[1](0)


def _parser():
    from qcache_jax.bench_cli import register

    p = argparse.ArgumentParser(prog="qcache")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_json_fields_consistent(capsys, tiny2):
    args = _parser().parse_args(
        ["bench", "random:tiny:2", "--batch", "2", "--prompt-tokens", "3", "--image-tokens", "16", "--new-tokens", "3",
         "--lazy", "1", "--mode", "gla", "--repeats", "1", "--json"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    rep = json.loads(out[0])
    for k in ("jax_version", "backend", "device", "runs", "speedup", "kv_saved_fraction"):
        assert k in rep
    dense, lazy = rep["runs"]
    assert dense["mode"] == "dense" and lazy["mode"] == "gla" and lazy["n_lazy"] == 1
    assert dense["speedup"] == 1.0 and rep["speedup"] == lazy["speedup"] > 0
    assert dense["kv_cache_bytes"] == dense["dense_kv_cache_bytes"] == lazy["dense_kv_cache_bytes"]
    assert lazy["kv_saved_fraction"] == pytest.approx(1 / 4)  # GLA: n_lazy / (2L)
    assert lazy["kv_cache_bytes"] == pytest.approx(0.75 * dense["kv_cache_bytes"])
    for r in (dense, lazy):
        assert r["batch"] == 2 and r["image_tokens"] == 16 and r["new_tokens"] == 3
        assert r["prefill_seconds"] > 0 and r["decode_tokens_per_second"] > 0 and r["compile_seconds"] > 0
        assert r["decode_ms_per_step"] == pytest.approx(1e3 * 2 / r["decode_tokens_per_second"])
    from qcache_jax.bench_cli import format_report

    table = format_report(rep)
    assert "jax" in table and "| gla |" in table and "| dense |" in table


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["random:nope"], "PRESET"),
        (["random:tiny:2", "--image-tokens", "5"], "multiple"),
        (["random:tiny:2", "--lazy", "0"], "layer 0"),
        (["random:tiny:2", "--new-tokens", "1"], "new-tokens"),
        (["/nonexistent/ckpt"], "no such checkpoint"),
    ],
)
def test_cli_user_errors(argv, msg):
    args = _parser().parse_args(["bench", *argv])
    with pytest.raises(QCacheError, match=msg):
        args.func(args)


def test_decode_bench_matches_generate(tiny2):
    """The decode-only timer feeds the engine's decode the state generate would: same tokens."""
    per = tiny2.config.image_tokens_per_image
    sched = bench.lazy_schedule(2, 0.5)
    # Same sizes as the CLI test: the batch-2 executables are reused from it.
    db = bench.DecodeBench(tiny2, batch=2, prompt_tokens=3, image_tokens=per, new_tokens=3, lazy=sched, mode="gla")
    res = bench.compare_decode({"gla": db}, rounds=1)["gla"]
    ids, pv = bench.make_inputs(tiny2.config, batch=1, prompt_tokens=3, image_tokens=per)
    ref = tiny2.generate(input_ids=ids, pixel_values=pv, lazy=sched, mode="gla", max_new_tokens=3, eos_token_id=-1)
    assert db.tokens == ref.token_ids * 2
    assert res["cache_rows"] == 2 and res["batch"] == 2 and res["speedup"] == 1.0
    assert res["kv_cache_bytes"] == ref.kv_cache_bytes * 2  # 2 rows vs 1
    assert res["kv_saved_fraction"] == pytest.approx(ref.kv_saved_fraction)
    assert res["decode_runs"] == 1 and res["decode_tokens_per_second"] > 0


def test_render_benchmarks_md(tmp_path):
    """BENCHMARKS.md and the plots from synthetic results: every table and target present."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    p = run.PROFILES["cpu"]
    env = bench.environment()
    dec = []
    for img in (576, 2880):
        for name, n, sp in (("dense", 0, 1.0), ("GLA 0.7", 11, 1.35), ("VLA 0.7", 11, 1.1)):
            dec.append(dict(name=name, mode=name.split()[0].lower(), n_lazy=n, num_layers=16, batch=4, image_tokens=img,
                            cache_image_len=img, kv_cache_bytes=100 * 2**20, kv_saved_fraction=n / 32,
                            decode_tokens_per_second=10.0 * sp, decode_ms_per_step=100 / sp, speedup=sp, compile_seconds=9.0))
    dec += [dict(dec[-1], name="GLA 0.25", n_lazy=4, speedup=1.1), dict(dec[-1], name="VLA 0.25", mode="vla", n_lazy=4)]
    dec = [dict(d, lazy_fraction=d["n_lazy"] / 16) for d in dec]
    hf = dict(batch=1, image_tokens=576, prompt_tokens=32, new_tokens=32, params=286e6, rows=[
        dict(name="HF PyTorch generate (sdpa)", prefill_seconds=2.0, decode_tokens_per_second=5.0, e2e_tokens_per_second=4.0,
             decode_vs_hf=1.0, e2e_vs_hf=1.0, prefill_vs_hf=1.0, same_tokens_as_hf=True, compile_seconds=0.0,
             torch_version="x", torch_threads=2),
        dict(name="qcache-jax dense", prefill_seconds=1.0, decode_tokens_per_second=9.0, e2e_tokens_per_second=8.0,
             decode_vs_hf=1.8, e2e_vs_hf=2.0, prefill_vs_hf=2.0, same_tokens_as_hf=True, compile_seconds=9.0),
    ])
    mem = run.section_memory(run.PROFILES["smoke"], print)
    results = dict(decode=dec, hf=hf, memory=mem, kernels="## Attention kernels: cpu\n\nsmoke",
                   meta=dict(profile="cpu", profile_sizes=p, preset="cpu-300m", dtype="float32", params=286e6, model="m",
                             command="python -m benchmarks.run", elapsed_seconds=60.0, environment=env))
    results["meta"]["profile_sizes"] = dict(p, fraction_point=(2880, 4))
    results["targets"] = run.targets(results, "cpu")
    assert [t["status"].split()[0] for t in results["targets"]] == ["met", "open", "met"]
    md = run.render(results)
    for needle in ("## Targets", "## Decode throughput", "## Lazy fraction sweep", "## Against Hugging Face", "## Largest batch",
                   "not yet measured on GPU", env["jax_version"], "**1.35x**", "## Attention kernels"):
        assert needle in md, needle
    written = run.plots(results, tmp_path)
    assert set(written) == {"decode_speedup.png", "fraction_sweep.png", "vs_hf.png", "max_batch.png"}
    assert all((tmp_path / w).stat().st_size > 1000 for w in written)


def test_decode_bench_synthetic_state(tiny2):
    """The synthetic-state decode runs the same shapes: same cache bytes, every row decodes."""
    per = tiny2.config.image_tokens_per_image
    sched = bench.lazy_schedule(2, 0.5)
    kw = dict(batch=2, prompt_tokens=3, image_tokens=per, new_tokens=3, lazy=sched, mode="gla")
    syn = bench.DecodeBench(tiny2, state="synthetic", **kw)
    real = bench.DecodeBench(tiny2, **kw)
    res = bench.compare_decode({"real": real, "synthetic": syn}, rounds=1)
    assert res["synthetic"]["decode_state"] == "synthetic" and res["real"]["decode_state"] == "prefill"
    for k in ("kv_cache_bytes", "dense_kv_cache_bytes", "cache_rows", "cache_image_len", "cache_text_len"):
        assert res["synthetic"][k] == res["real"][k], k
    assert [len(t) for t in syn.tokens] == [3, 3] and res["synthetic"]["speedup"] > 0
