"""Tensor and data parallel generate on a device mesh (docs/architecture.md, "Scaling out").

The mesh checks run in subprocesses, so this process keeps its one CPU device: 8 host devices
for meshes (1, 8), (2, 4), (8, 1) (tests/mesh_check.py), and two processes of 4 devices each
joined by ``jax.distributed`` on a loopback port. Both use XLA's quick compile settings; the
single-device references run under the same settings (mesh_check) or in this process (the
two-process test).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import run_cli

from qcache_jax.errors import QCacheError
from qcache_jax.runtime import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[1]
QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESHES = [(1, 8), (2, 4), (8, 1)]
MODES = ["dense", "gla", "vla"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "results.json"
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {QUICK_COMPILE}")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_check.py"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _run(results, shape, mode):
    (run,) = [r for r in results["runs"] if r["mesh"] == list(shape) and r["mode"] == mode]
    return run


def test_this_process_keeps_one_device(results):
    assert results["devices"] == 8
    assert jax.device_count() == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"data{s[0]}-model{s[1]}")
def test_mesh_generate_equals_one_device(results, shape, mode):
    """Greedy tokens equal, logits to float32 rounding (row-parallel sums add in another order)."""
    run = _run(results, shape, mode)
    assert run["same_tokens"], (run["tokens"], run["ref_tokens"])
    assert run["logits_max_diff"] < 1e-4
    assert run["second_same_tokens"]
    assert run["cache_rows"] % shape[0] == 0
    if "full_logits_max_diff" in run:
        assert run["full_logits_max_diff"] < 1e-4


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"data{s[0]}-model{s[1]}")
def test_a_new_prompt_compiles_nothing(results, shape):
    for mode in MODES:
        run = _run(results, shape, mode)
        assert run["second_prompt_compiles"] == 0 and run["second_prompt_compile_seconds"] == 0.0, run


def test_every_parameter_and_cache_array_is_sharded_as_the_docs_say(results):
    assert results["doc_rows"] >= 15  # the table was found and read
    for run in results["runs"]:
        assert run["params_wrong"] == [] and run["cache_wrong"] == [], run["mesh"]


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu_interpret"])
def test_kernels_run_per_shard(results, impl):
    """12 query heads over 4 shards with 6 replicated KV heads: each shard picks its heads' KV."""
    assert results["kernels_max_diff"][impl] < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_single_process_tokens(tiny_ckpt, image_path, capsys):
    """``qcache generate --mesh data=2,model=4 --distributed ...`` in two processes of 4 CPU
    devices each (gloo collectives, coordinator on a loopback port): Orbax restores each
    process's shards, and both print the tokens of the one-device run in this process."""
    args = ["generate", str(tiny_ckpt), "--prompt", "what is in the image ?", "--image", str(image_path),
            "--lazy", "2-3", "--mode", "gla", "--max-new-tokens", "6", "--json", "--quiet"]
    port = _free_port()
    env = _env(JAX_NUM_CPU_DEVICES="4", XLA_FLAGS=QUICK_COMPILE)
    procs = [
        subprocess.Popen([sys.executable, "-m", "qcache_jax.cli", *args, "--mesh", "data=2,model=4", "--distributed",
                          f"coordinator=127.0.0.1:{port},processes=2,id={i}"],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    single = json.loads(out)
    assert len(single["token_ids"]) > 0
    for o in outs:
        assert o["token_ids"] == single["token_ids"]
        assert o["kv_cache_bytes"] == single["kv_cache_bytes"]


def test_mesh_spec_parsing_and_errors():
    assert mesh_lib.parse_mesh("data=2,model=4") == (2, 4)
    assert mesh_lib.parse_mesh("model=8") == (1, 8)
    for bad in ("data=2,model=x", "model=0", "pipeline=2", "data=2,data=2", ""):
        with pytest.raises(QCacheError, match="--mesh"):
            mesh_lib.parse_mesh(bad)
    with pytest.raises(QCacheError, match="needs 8 devices, 1 available.*JAX_NUM_CPU_DEVICES"):
        mesh_lib.make_mesh(2, 4)
    assert mesh_lib.parse_distributed("coordinator=10.0.0.1:1234,processes=4,id=3") == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    with pytest.raises(QCacheError, match="--distributed"):
        mesh_lib.parse_distributed("coordinator=10.0.0.1:1234")


def test_rules_on_an_abstract_mesh():
    """The rules need only the axis sizes: LLaVA-1.5-7B (32 heads, 32 KV heads) on a mesh this
    machine does not have, and a model axis that does not divide the heads is an error."""
    from qcache_jax.tools.bench import preset_config

    cfg = preset_config("llava-1.5-7b")
    table = dict(mesh_lib.spec_table(cfg, mesh_lib.abstract_mesh(2, 4)))
    assert table["language_model.layers.*.self_attn.k_proj.kernel"] == "P(None, 'model')"
    assert table["language_model.layers.*.self_attn.o_proj.kernel"] == "P('model', None)"
    assert table["lm_head.kernel"] == "P(None, 'model')"
    assert table["vision_tower.encoder.layers.*.mlp.fc1.kernel"] == "P()"
    with pytest.raises(QCacheError, match="must divide the number of attention heads"):
        mesh_lib.check_model(cfg, mesh_lib.abstract_mesh(1, 3))


def test_cli_rejects_a_bad_mesh_before_loading(tiny_ckpt, capsys):
    code, _, err = run_cli(["generate", str(tiny_ckpt), "--prompt", "hi", "--mesh", "data=two"], capsys)
    assert code == 2 and "--mesh" in err


@pytest.mark.parametrize("argv", [
    ["generate", "CKPT", "--prompt", "hi"], ["eval", "CKPT", "--data", "x.jsonl"], ["bench", "random:tiny"],
    ["calibrate", "CKPT", "--data", "dir"],
], ids=lambda a: a[0])
def test_every_running_command_takes_a_mesh(argv):
    from qcache_jax.cli import build_parser

    args = build_parser().parse_args([*argv, "--mesh", "data=2,model=4"])
    assert args.mesh == "data=2,model=4"


def test_scaling_note_is_computed_from_the_shardings():
    """BENCHMARKS.md's scaling section: per-device bytes from jax.eval_shape and the real
    shardings, dense vs GLA vs VLA, labelled as computed."""
    from benchmarks import run
    from qcache_jax.tools.bench import mesh_scaling

    sc = mesh_scaling()
    rows = {(r["model"], tuple(r["mesh"])): r for r in sc["rows"]}
    one, tp8, dp8 = (rows[("LLaVA-1.5-7B", s)] for s in ((1, 1), (1, 8), (8, 1)))
    assert one["param_bytes_per_device"] == one["param_bytes_total"] == dp8["param_bytes_per_device"]
    # Tensor parallel splits the decoder and the vocabulary; the vision tower stays whole.
    assert one["param_bytes_total"] / 8 < tp8["param_bytes_per_device"] < one["param_bytes_total"] / 5
    for r in sc["rows"]:
        assert r["kv_bytes_per_device_gla"] < r["kv_bytes_per_device_vla"] < r["kv_bytes_per_device_dense"]
    assert tp8["kv_bytes_per_device_dense"] * 8 == one["kv_bytes_per_device_dense"] == dp8["kv_bytes_per_device_dense"] * 8
    md = "\n".join(run.render_scaling(sc))
    assert "computed, not measured" in md and "LLaVA-NeXT-13B" in md
