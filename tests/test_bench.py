"""The benchmark harness: the smoke profile end to end, the worker protocol, the bandwidth
model, and ``qcache bench``'s options. Tiny models only; nothing here asserts a timing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from qcache_jax.errors import QCacheError
from qcache_jax.tools import bench

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402

EXPECTED_KEYS = {"meta", "machine", "settings", "bandwidth", "peers", "vs_hf", "lazy", "bandwidth_use", "memory",
                 "kv_budget", "targets", "runs", "scaling"}


@pytest.fixture(scope="session")
def cache_dir():
    """The benchmark models' cache ($QCACHE_BENCH_CACHE or ~/.cache/qcache-jax/bench): the
    tiny models are built once (atomically) and reused by later sessions."""
    return bench.cache_root()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("smoke") / "BENCHMARKS.md"
    assert run.main(["--profile", "smoke", "--out", str(out), "--cache-dir", str(cache_dir)]) == 0
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


# -- parsing the generated markdown back ----------------------------------------------------------


def tables(md: str) -> dict[str, list[dict]]:
    """Every table under each ``## `` heading, as lists of {column: cell}."""
    out, section, lines = {}, None, md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(head, [c.strip() for c in lines[i].strip("|").split("|")])))
                i += 1
            out.setdefault(section, []).append(rows)
            continue
        i += 1
    return out


def num(cell: str) -> float:
    return float(cell.rstrip("x%").replace(",", ""))


def section(t, prefix):
    found = [v for k, v in t.items() if k.startswith(prefix)]
    assert found, prefix
    return found[0]


def check_ratio(shown_ratio: str, a: str, b: str):
    """A ratio printed with 2 decimals equals a / b of the printed medians (to its rounding)."""
    assert num(shown_ratio) == pytest.approx(num(a) / num(b), abs=0.0051), (shown_ratio, a, b)


def test_smoke_ratios_are_the_ratios_of_the_printed_medians(smoke):
    md, res = smoke
    t = tables(md)
    assert "## Targets" in md and res["machine"]["cpu"] in md
    if res["machine"]["commit"]:
        assert res["machine"]["commit"][:12] in md

    peers, speedups = section(t, "Peers")
    by = {r["engine"]: r for r in peers}
    ours = by["qcache-jax (ours)"]
    others = ["Hugging Face generate (sdpa)"]
    if bench.llama_cpp_available():  # then the text model also ran in llama.cpp, from an F32 GGUF
        others.append("llama.cpp")
    else:
        assert by["llama.cpp"]["prefill b1 s"] == "not installed"
    for name in others:
        row = next(r for r in speedups if name in r["speedup (from the table above)"])
        for b in res["settings"]["text"]["batches"]:
            check_ratio(row[f"prefill b{b}"], by[name][f"prefill b{b} s"], ours[f"prefill b{b} s"])
            check_ratio(row[f"decode b{b}"], ours[f"decode b{b} tok/s"], by[name][f"decode b{b} tok/s"])
            assert row[f"same tokens b{b}"] == "yes"  # the same weights, greedy

    (vs,) = section(t, "Ours (dense) against Hugging Face")
    assert len(vs) == len(res["settings"]["text"]["batches"]) + len(res["settings"]["vision"]["batches"])
    for r in vs:
        check_ratio(r["prefill speedup"], r["HF prefill s"], r["ours prefill s"])
        check_ratio(r["decode speedup"], r["ours decode tok/s"], r["HF decode tok/s"])

    (lazy,) = section(t, "Lazy attention")
    assert {r["config"] for r in lazy} == {"dense", "GLA 0.5", "VLA 0.5"}
    for r in lazy:
        dense = next(d for d in lazy if d["config"] == "dense" and d["batch"] == r["batch"])
        check_ratio(r["lazy/dense"], r["decode tok/s"], dense["decode tok/s"])
        assert r["model"].endswith("x") and (r["flag"] == "") == (num(r["lazy/dense"]) <= 1.1 * num(r["model"]))
    gla = next(r for r in lazy if r["config"] == "GLA 0.5")
    assert num(gla["KV saved"]) == pytest.approx(25.0)  # 2 of 4 layers keep no keys: 2 / (2 * 4)

    (bw,) = section(t, "Decode against the read bandwidth")
    bandwidth = num(re.search(r"the measured ([\d.]+) GB/s", md).group(1))
    for r in bw:
        assert num(r["% of bandwidth"]) == pytest.approx(100 * num(r["GB/s"]) / bandwidth, abs=0.51)

    (mem,) = section(t, "Peak resident memory")
    for r in mem:
        check_ratio(r["factor"], r["peak RSS MiB"], str(num(r["weights MiB"]) + num(r["KV MiB"])))
        assert num(r["peak RSS MiB"]) > 0

    (budget,) = section(t, "Throughput under a fixed KV-cache budget")
    assert [r["config"] for r in budget] == ["dense", "GLA 0.5", "VLA 0.5"]
    dense = budget[0]
    budget_mib = res["settings"]["budget"]["budget_bytes"] / 2**20
    for r in budget:
        check_ratio(r["vs dense"], r["tokens/s (wall)"], dense["tokens/s (wall)"])
        assert num(r["KV cache MiB"]) <= budget_mib
    # GLA keeps no keys in half its layers, so twice the rows fit this budget.
    assert int(budget[1]["batch"]) == 2 * int(dense["batch"])

    (targets,) = section(t, "Targets")
    assert {r["status"] for r in targets} <= {"met", "missed", "n/a"}


def test_smoke_results_json(smoke):
    md, res = smoke
    assert set(res) == EXPECTED_KEYS == set(run.RESULT_KEYS)
    assert res["meta"]["command"].startswith("python -m benchmarks.run --profile smoke")
    assert res["settings"]["profile"] == "smoke" and res["settings"]["rounds"] >= 1
    for key, r in res["runs"].items():
        assert len(r["per_round"]["decode_tokens_per_second"]) == r["rounds"], key
        assert r["decode_tokens_per_second"] == pytest.approx(np.median(r["per_round"]["decode_tokens_per_second"]))
        assert r["peak_rss_bytes"] > 0
    # Same weights, greedy: our dense tokens equal Hugging Face's.
    assert all(r["same_tokens"] for r in res["vs_hf"])
    assert run.render(res) == md  # the markdown is a function of the results alone


# -- the worker protocol ----------------------------------------------------------------------------


def test_worker_protocol_reports_times_rss_and_errors():
    req = dict(batch=2, prompt_tokens=3, image_tokens=16, new_tokens=3, seed=0)
    with bench.Worker("ours", "random:tiny:2", threads=1) as w:
        assert w.info["ok"] and w.info["threads"] == 1 and w.info["weights_bytes"] > 0
        dense = w.request("run", **req)
        lazy = w.request("run", **req, lazy=[False, True], mode="gla")
        with pytest.raises(QCacheError, match="no command"):
            w.request("nonsense")
        with pytest.raises(QCacheError, match="multiple"):
            w.request("run", **dict(req, image_tokens=5))
        again = w.request("run", **req)  # the worker survives errors
        plan = w.request("plan", **req)
        bw = w.request("bandwidth", gib=1 / 64, repeats=2)
    for r in (dense, lazy, again):
        # the peak restarts at the resident size of the reset; it can read a few pages below the
        # size read just before (the kernel's per-CPU RSS counters are batched, and generate
        # gives freed heap back first), never a MiB below
        assert r["peak_rss_bytes"] >= r["rss_before_bytes"] - 2**20 and r["rss_before_bytes"] > 0 and r["peak_reset"]
        assert r["prefill_seconds"] > 0 and r["decode_tokens_per_second"] > 0
        assert r["decode_tokens"] == 2 * (3 - 1) and [len(t) for t in r["token_ids"]] == [3, 3]
    assert dense["compile_seconds"] > 0 and again["compile_seconds"] == 0
    assert again["token_ids"] == dense["token_ids"]
    assert lazy["mode"] == "gla" and lazy["lazy_layers"] == [1]
    assert lazy["kv_cache_bytes"] == 0.75 * dense["kv_cache_bytes"]
    assert plan["step_bytes"] == dense["step_bytes"] and plan["kv_cache_bytes"] == dense["kv_cache_bytes"]
    assert bw["bytes"] == 2**24 and len(bw["seconds"]) == 2


def test_worker_startup_error_is_one_line():
    with pytest.raises(QCacheError, match="PRESET"):
        bench.Worker("ours", "random:nope", threads=1)


# -- the bandwidth model ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "gla", "vla"])
def test_step_bytes_matches_a_hand_count(mode):
    from qcache_jax.lazy.cache import CacheLayout
    from qcache_jax.lazy.schedule import Schedule

    cfg = bench.preset_config("tiny")  # hidden 64, MLP 128, 4 layers, 4 heads / 2 KV heads of 16, vocab 256
    sched = Schedule.dense(4) if mode == "dense" else Schedule.from_layers([1, 3], 4, mode)
    rows, img, txt = 2, 16, 32
    got = bench.step_bytes(cfg, CacheLayout(batch=rows, image_len=img, text_len=txt, schedule=sched))
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64
    mlp, norms = 3 * 64 * 128, 2 * 64
    layer = q + k + v + o + mlp + norms
    gla_layer = layer - q - k  # a GLA lazy layer uses its anchor's queries and keys
    head = 64 + 64 * 256 + rows * 64  # final norm, lm_head, one embedding row per cache row
    n_gla = 2 if mode == "gla" else 0
    weights = 4 * ((4 - n_gla) * layer + n_gla * gla_layer + head)
    seg = rows * 2 * 16 * 4  # bytes per cached token of one K or V array: rows x KV heads x head dim x 4
    dense_layer_kv = 2 * (img + txt) * seg  # K and V, both segments
    # GLA lazy: V only; VLA lazy: V and its own text K (the anchor's probabilities replace visual K)
    lazy_kv = {"dense": dense_layer_kv, "gla": (img + txt) * seg, "vla": (img + 2 * txt) * seg}[mode]
    kv = 2 * dense_layer_kv + 2 * lazy_kv
    assert got == {"weights_bytes": weights, "kv_bytes": kv, "bytes": weights + kv}


def test_presets_and_schedules():
    from qcache_jax.nn.families import abstract_model

    n, _ = bench.count_params(abstract_model(bench.preset_config("cpu-300m"))[1])
    assert 250e6 < n < 350e6 and bench.preset_config("cpu-300m").image_tokens_per_image == 576
    assert bench.preset_config("tiny-text").has_vision is False
    for layers in (4, 16, 30):
        for f in (0.25, 0.5, 0.7):
            s = bench.lazy_schedule(layers, f, "vla")
            assert not s.lazy[0] and s.n_lazy == round(f * layers) and s.mode == "vla"
    with pytest.raises(QCacheError):
        bench.preset_config("gpt-5")
    ids, pv = bench.make_inputs(bench.preset_config("tiny"), batch=3, prompt_tokens=5, image_tokens=32)
    assert ids.shape == (3, 38) and pv.shape[0] == 6
    with pytest.raises(QCacheError, match="text-only"):
        bench.make_inputs(bench.preset_config("tiny-text"), batch=1, prompt_tokens=5, image_tokens=16)


def test_next_presets_are_real_anyres_inputs():
    """The NeXT presets' image token counts come from the model's own anyres packing; their
    inputs are LlavaNextProcessor-shaped (views per image, image_sizes); --image-tokens picks
    the image size or is refused."""
    from qcache_jax.nn import anyres
    from qcache_jax.nn.families import abstract_model

    for name in bench.NEXT_PRESETS:
        cfg = bench.preset_config(name)
        assert cfg.anyres and bench.default_image_tokens(cfg) == anyres.image_token_count(
            bench.default_image_size(cfg), cfg)
    # next-cpu / llava-next-7b: one 672x672 image = base view (24 x 24) + 2x2 tiles (48 rows of 48) + 48 newlines.
    for name in ("next-cpu", "llava-next-7b"):
        cfg = bench.preset_config(name)
        assert cfg.image_grid_pinpoints == bench.NEXT_PINPOINTS and bench.default_image_size(cfg) == (672, 672)
        assert bench.default_image_tokens(cfg) == 576 + 48 * (48 + 1) == 2928
    # llava-v1.6-vicuna-7b's sizes, from eval_shape alone (never built on CPU here).
    n_7b, bytes_7b = bench.count_params(abstract_model(bench.preset_config("llava-next-7b", dtype="bfloat16"))[1])
    assert 7.0e9 < n_7b < 7.1e9 and bytes_7b == 2 * n_7b
    # next-cpu: cpu-300m's decoder and tower, plus image_newline.
    n_cpu = [bench.count_params(abstract_model(bench.preset_config(n))[1])[0] for n in ("next-cpu", "cpu-300m")]
    assert n_cpu[0] == n_cpu[1] + 1024

    cfg = bench.preset_config("tiny-next")  # 28 px views of 16 tokens, v1.6's grids scaled to 28 px
    assert bench.default_image_size(cfg) == (56, 56) and bench.default_image_tokens(cfg) == 16 + 8 * 9
    counts = bench.next_image_tokens(cfg)
    for n, size in counts.items():
        assert bench.next_image_size(cfg, n) == size and anyres.image_token_count(size, cfg) == n
    inputs = bench.bench_inputs(cfg, batch=3, prompt_tokens=5, image_tokens=52)
    size = tuple(inputs["image_sizes"][0])
    assert inputs["image_sizes"].tolist() == [list(size)] * 3 and anyres.image_token_count(size, cfg) == 52
    assert inputs["pixel_values"].shape == (3, anyres.num_views(size, cfg), 3, 28, 28)
    assert inputs["input_ids"].shape == (3, 1 + 52 + 5) and ((inputs["input_ids"] == 255).sum(1) == 52).all()
    assert bench.bench_inputs(cfg, batch=1, prompt_tokens=5, image_tokens=0)["pixel_values"] is None
    missing = next(n for n in range(min(counts), max(counts)) if n not in counts)
    with pytest.raises(QCacheError, match=f"--image-tokens {missing}: no image size"):
        bench.bench_inputs(cfg, batch=1, prompt_tokens=5, image_tokens=missing)
    with pytest.raises(QCacheError, match="image_sizes"):
        bench.make_inputs(cfg, batch=1, prompt_tokens=5, image_tokens=88)


def test_next_bench_run_dense_and_lazy(capsys):
    """random:tiny-next in a worker: the engine ran one image per row whose size gives exactly
    the requested image tokens (counted in the input_ids it generated from), dense and GLA,
    and the report names the image."""
    from qcache_jax.cli.bench import bench_report, format_report
    from qcache_jax.nn import anyres

    cfg = bench.preset_config("tiny-next", num_layers=2)
    req = {"batch": 2, "prompt_tokens": 3, "image_tokens": 52, "new_tokens": 3, "seed": 0}
    with bench.Worker("ours", "random:tiny-next:2", threads=1) as w:
        jobs = [bench.Job("dense", w, dict(req, lazy=None, mode=None)),
                bench.Job("gla", w, dict(req, lazy=[False, True], mode="gla"))]
        results = {k: bench.summarize(v) for k, v in bench.interleave(jobs, 1).items()}
        vla = w.request("plan", **req, lazy=[False, True], mode="vla")
        with pytest.raises(QCacheError, match="no image size"):
            w.request("run", **dict(req, image_tokens=17))
    size = bench.next_image_size(cfg, 52)
    for name, r in results.items():
        assert r["prompt_image_tokens"] == anyres.image_token_count(r["image_size"], cfg) == 52, name
        assert tuple(r["image_size"]) == size and r["image_views"] == anyres.num_views(size, cfg)
        assert r["prompt_len"] == 1 + 52 + 3 and [len(t) for t in r["token_ids"]] == [3, 3]
        assert r["cache_image_len"] >= 52
    dense, gla = results["dense"], results["gla"]
    assert gla["lazy_layers"] == [1] and gla["kv_cache_bytes"] == 0.75 * dense["kv_cache_bytes"]
    share = vla["cache_image_len"] / (vla["cache_image_len"] + vla["cache_text_len"])  # VLA drops visual keys
    assert vla["kv_cache_bytes"] == pytest.approx(dense["kv_cache_bytes"] * (1 - 0.25 * share))
    rep = bench_report("random:tiny-next:2", results, threads=1, image_tokens=52, prompt_tokens=3, image_size=size)
    assert all(r["image_size"] == list(size) and r["prompt_image_tokens"] == 52 for r in rep["runs"])
    assert f"one {size[0]}x{size[1]} image per row" in format_report(rep)


def test_f32_gguf_holds_the_checkpoint_weights(cache_dir, tmp_path):
    """The llama.cpp GGUF is written from our checkpoint: reading it back gives the same tensors."""
    from qcache_jax.io.checkpoint import load_params, read_config
    from qcache_jax.io.export import hf_tensors
    from qcache_jax.io.gguf import GGUFSource

    files = bench.prepare("tiny-text", cache_dir=cache_dir)
    src = GGUFSource(bench.write_f32_gguf(files.ckpt, tmp_path / "m.gguf"))
    cfg = read_config(files.ckpt)
    ref = hf_tensors(cfg, load_params(files.ckpt, cfg))
    assert set(src.keys()) == set(ref)
    for k in ref:
        assert src.tensor_type(k) == "F32"
        np.testing.assert_array_equal(src.get(k), ref[k])


# -- qcache bench ---------------------------------------------------------------------------------------


def _main(argv, capsys):
    from qcache_jax.cli import main

    code = main(argv)
    return code, capsys.readouterr()


def test_cli_json_fields(capsys):
    code, out = _main(["bench", "random:tiny:2", "--batch", "2", "--prompt-tokens", "3", "--new-tokens", "3",
                       "--lazy", "1", "--mode", "gla", "--repeats", "1", "--threads", "1", "--json"], capsys)
    assert code == 0
    lines = out.out.strip().splitlines()
    assert len(lines) == 1
    rep = json.loads(lines[0])
    dense, lazy = rep["runs"]
    assert dense["config"] == "dense" and lazy["config"] == "gla" and lazy["lazy_layers"] == [1]
    assert dense["lazy_over_dense"] == 1.0 and rep["lazy_over_dense"] == lazy["lazy_over_dense"] > 0
    assert lazy["kv_saved_fraction"] == pytest.approx(0.25) and rep["threads"] == 1
    assert lazy["model_lazy_over_dense"] > 1.0 == dense["model_lazy_over_dense"]
    for r in rep["runs"]:
        assert r["batch"] == 2 and r["image_tokens"] == 16 and r["new_tokens"] == 3 and r["repeats"] == 1
        assert r["decode_ms_per_step"] == pytest.approx(1e3 * 2 / r["decode_tokens_per_second"])
    from qcache_jax.cli.bench import format_report

    table = format_report(rep)
    assert "| gla |" in table and "| dense |" in table


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["random:nope"], "PRESET"),
        (["random:tiny:x"], "LAYERS"),
        (["random:tiny:2", "--image-tokens", "5"], "multiple"),
        (["random:tiny-text", "--image-tokens", "16"], "text-only"),
        (["random:tiny-next:2", "--image-tokens", "17"], "no image size"),
        (["random:tiny-next:2", "--image-tokens", "-3"], ">= 0"),
        (["random:tiny:2", "--lazy", "0"], "layer 0"),
        (["random:tiny:2", "--lazy", "1", "--mode", "gla", "--new-tokens", "1"], "new-tokens"),
        (["random:tiny:2", "--batch", "0"], "batch"),
        (["random:tiny:2", "--threads", "0"], "threads"),
        (["/nonexistent/ckpt"], "no such checkpoint"),
    ],
)
def test_cli_user_errors_are_one_line(argv, msg, capsys):
    code, out = _main(["bench", *argv], capsys)
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0] and err[0].startswith("qcache bench: error:")
    assert out.out == ""


def test_cli_help_renders_cleanly(capsys):
    from qcache_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert text.count("usage:") == 1 and "qcache bench CKPT [" not in text and "``" not in text
    for opt in ("--batch", "--prompt-tokens", "--image-tokens", "--new-tokens", "--lazy", "--mode", "--json",
                "--repeats", "--threads"):
        assert opt in text


def test_serve_benchmark_smoke(tmp_path, cache_dir):
    """benchmarks.serve end to end on a tiny model: three real servers under one budget, the
    section put into an existing BENCHMARKS.md (the rest kept, a second run replaces it), the
    ratios those of the printed numbers, every requested token generated; putting another
    section in (as benchmarks.run does when it re-renders) keeps it."""
    from benchmarks import serve

    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nintro\n\n## Targets\n\nthe targets\n")
    argv = ["--profile", "smoke", "--out", str(out), "--cache-dir", str(cache_dir)]
    assert serve.main(argv) == 0
    md = out.read_text()
    assert md.startswith("# Benchmarks\n\nintro\n") and md.rstrip().endswith("the targets")
    assert md.count(serve.TITLE) == 1
    t = section(tables(md), serve.TITLE[3:])
    load, where = t
    rows = {r["server"]: r for r in load}
    assert set(rows) == {"dense", "gla-0.5", "vla-0.5", "HF generate"}
    assert int(rows["gla-0.5"]["slots (budget)"]) > int(rows["dense"]["slots (budget)"])
    for k in ("gla-0.5", "vla-0.5"):
        check_ratio(rows[k]["vs dense"], rows[k]["output tok/s"], rows["dense"]["output tok/s"])
        w = {r["server"]: r for r in where}
        check_ratio(w[k]["vs dense"], w[k]["decode tok/s"], w["dense"]["decode tok/s"])
    res = json.loads(out.with_suffix(".serve.json").read_text())
    p = res["settings"]
    for runs in res["runs"].values():
        for r in runs:
            assert len(r["ttft"]) == p["requests"] and r["tokens"] == sum(
                p["min_new"] + (i * 37) % (p["max_new"] - p["min_new"] + 1) for i in range(p["requests"]))
    assert serve.main(["--render-only"] + argv) == 0 and out.read_text() == md  # rendering is deterministic
    kept = run.section(md, run.SERVE_TITLE)
    run.put_section(out, "## Other", "## Other\n\nx\n")
    assert run.section(out.read_text(), run.SERVE_TITLE) == kept


def test_fastv_section_renders_the_ratios_of_its_numbers(tmp_path):
    """benchmarks.fastv's section from a results file (--render-only): every ratio is the ratio of
    the printed numbers, the pruned checkpoint's savings are computed, and benchmarks.run keeps
    the section when it re-renders BENCHMARKS.md."""
    from benchmarks import fastv

    def row(lazy, fv, kv, dense_kv, step, tok_s):
        return dict(lazy_layers=lazy, mode="gla" if lazy else "dense", fastv=fv, kv_cache_bytes=kv,
                    dense_kv_cache_bytes=dense_kv, step_bytes={"bytes": step}, decode_tokens_per_second=tok_s,
                    prefill_seconds=0.5, per_round=[tok_s])

    mib = 2**20
    rows = {"dense": row([], None, 10 * mib, 10 * mib, 500 * mib, 30.0),
            "FastV 2:0.5": row([], "2:0.5", 7 * mib, 10 * mib, 497 * mib, 31.5),
            "gla-0.7": row([2, 4], None, 6.5 * mib, 10 * mib, 480 * mib, 33.0),
            "gla-0.7 (unroll)": row([2, 4], None, 6.5 * mib, 10 * mib, 480 * mib, 32.0),
            "gla-0.7 pruned (unroll)": row([2, 4], None, 6.5 * mib, 10 * mib, 480 * mib, 32.8)}
    res = dict(date="2026-12-07", git={"commit": "abcdef0"}, machine={"cpu": "cpu"}, jax="0", num_layers=30, batch=8,
               new_tokens=64, rounds=5, image_tokens=64, bandwidth_gbps=[35.0, 34.0], rows=rows,
               prune=dict(variant="gla-0.7", schedule="2,4 (gla)", layers=[2, 4],
                          checkpoint_bytes={"unpruned": 1000, "pruned": 900}, load_seconds={"unpruned": 2.0, "pruned": 1.5},
                          param_bytes={"unpruned": 2000, "pruned": 1700}, same_tokens=True))
    results, out = tmp_path / "f.json", tmp_path / "B.md"
    results.write_text(json.dumps(res))
    out.write_text("# Benchmarks\n\nintro\n\n## Targets\n\nthe targets\n")
    assert fastv.main(["--render-only", "--results", str(results), "--out", str(out)]) == 0
    md = out.read_text()
    assert md.count(fastv.TITLE) == 1 and md.rstrip().endswith("the targets")
    speed, prune = section(tables(md), fastv.TITLE[3:])
    by = {r["configuration"]: r for r in speed}
    assert set(by) == set(rows)
    for k, r in by.items():
        check_ratio(r["vs dense"], r["decode tok/s"], by["dense"]["decode tok/s"])
        check_ratio(r["bandwidth model"], by["dense"]["bytes per step MiB"], r["bytes per step MiB"])
    assert by["FastV 2:0.5"]["KV saved"] == "30.0%" and by["gla-0.7"]["lazy layers (run)"] == "2,4"
    p = {r[""]: r for r in prune}
    assert p["checkpoint bytes"]["saved"] == "10.0%" and p["load s (median)"]["saved"] == "25.0%"
    assert p["parameters resident after load"]["saved"] == "15.0%"
    assert "Same greedy tokens, pruned and unpruned (scan and unroll): **yes**" in md
    assert run.FASTV_TITLE in run.OWN_SECTIONS  # benchmarks.run puts it back after re-rendering
    with pytest.raises(QCacheError, match="no results"):
        fastv.main(["--render-only", "--results", str(tmp_path / "none.json"), "--out", str(out)])


def test_long_context_section_smoke(tmp_path, cache_dir, capsys):
    """benchmarks.long_context end to end on a tiny text model (ours and HF): the section's rows,
    the same greedy tokens, step ratios and KiB per cached token computed from the results, and a
    deterministic re-render; a bad --contexts is one line."""
    from benchmarks import long_context as lc

    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nintro\n\n## Targets\n\nthe targets\n")
    argv = ["--model", "tiny-text", "--contexts", "24,60", "--new-tokens", "3", "--rounds", "1", "--no-llama-cpp",
            "--out", str(out), "--cache-dir", str(cache_dir)]
    assert lc.main(argv) == 0
    md = out.read_text()
    assert md.count(lc.TITLE) == 1 and md.rstrip().endswith("the targets")
    speed, cache = section(tables(md), lc.TITLE[3:])
    assert [(r["engine"], r["context"]) for r in speed] == [
        ("qcache-jax (ours)", "24"), ("qcache-jax (ours)", "60"),
        ("Hugging Face generate (sdpa)", "24"), ("Hugging Face generate (sdpa)", "60")]
    assert all(r["same tokens as ours"] == "yes" for r in speed[2:])
    res = json.loads(out.with_suffix(".long_context.json").read_text())
    for r in speed:
        e = "ours" if r["engine"].startswith("qcache") else "hf"
        step = 1e3 / res["runs"][f"{e}/{r['context']}"]["decode_tokens_per_second"]
        base = 1e3 / res["runs"][f"{e}/24"]["decode_tokens_per_second"]
        check_ratio(r["step vs shortest"], f"{step:.6g}", f"{base:.6g}")
    assert [float(r["KiB per cached token"]) for r in cache] == [float(cache[0]["KiB per cached token"])] * 2
    assert int(cache[1]["text capacity"]) > int(cache[0]["text capacity"])
    assert lc.main(["--render-only"] + argv) == 0 and out.read_text() == md
    capsys.readouterr()
    assert run_cli_module(lc, ["--contexts", "4k", "--out", str(out)], capsys) == 2


def run_cli_module(module, argv, capsys) -> int:
    """``module``'s entry point as ``python -m`` runs it: the exit status, one line on stderr."""
    from qcache_jax.errors import run_entry_point

    code = run_entry_point(module.__name__, lambda: module.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--contexts" in err[0], err
    return code
