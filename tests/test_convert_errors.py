"""Bad checkpoints and bad options: one clear line, non-zero exit, nothing left at OUT."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qcache_jax import QCacheError, convert_hf
from qcache_jax import cli
from qcache_jax.demo.hf_models import build_hf_llava
from tiny_models import layout_state_dict, write_state_dict


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_llava(seed=11, num_layers=2, vision_layers=2)


def _src(model, tmp_path, edit=None):
    src = tmp_path / "hf"
    model.save_pretrained(str(src))
    if edit is not None:
        sd = layout_state_dict(model, "saved")
        edit(sd)
        write_state_dict(sd, src, "safetensors")
    return src


def _run_cli(argv, capsys):
    capsys.readouterr()  # drop what building the source model printed
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary files left behind"


def _missing(sd):
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]


def _extra(sd):
    sd["language_model.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)


def _misshapen(sd):
    sd["multi_modal_projector.linear_1.weight"] = torch.zeros(5, 7)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (_missing, "missing (1): language_model.layers.1.mlp.up_proj.weight"),
        (_extra, "unexpected (1): language_model.model.layers.0.self_attn.extra_proj.weight"),
        (_misshapen, "misshapen (1): multi_modal_projector.linear_1.weight (got (5, 7)"),
    ],
)
def test_tensor_mismatch(edit, needle, hf_model, tmp_path, capsys):
    src = _src(hf_model, tmp_path, edit)
    out = tmp_path / "out"
    code, err = _run_cli(["convert", str(src), str(out), "--quiet"], capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    _assert_clean(tmp_path, out)


def test_truncated_safetensors(hf_model, tmp_path, capsys):
    src = _src(hf_model, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "out"
    code, err = _run_cli(["convert", str(src), str(out), "--quiet"], capsys)
    assert code == 2 and "truncated" in err and "model.safetensors" in err, err
    _assert_clean(tmp_path, out)


def test_garbage_safetensors(hf_model, tmp_path):
    src = _src(hf_model, tmp_path)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(QCacheError, match="corrupted safetensors header"):
        convert_hf(src, tmp_path / "out", progress=False)


def test_unsupported_model_type(hf_model, tmp_path, capsys):
    src = _src(hf_model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, err = _run_cli(["convert", str(src), str(out), "--quiet"], capsys)
    assert code == 2 and "unsupported text model_type 'gpt2'" in err, err
    _assert_clean(tmp_path, out)


def test_unsupported_top_level_model_type(hf_model, tmp_path):
    src = _src(hf_model, tmp_path)
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(QCacheError, match="unsupported model_type 'bert'"):
        convert_hf(src, tmp_path / "out", progress=False)


def test_existing_out_refused_then_forced(hf_model, tmp_path, capsys):
    src = _src(hf_model, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _run_cli(["convert", str(src), str(out), "--quiet"], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").exists()
    code, _ = _run_cli(["convert", str(src), str(out), "--quiet", "--force"], capsys)
    assert code == 0 and (out / "qcache_config.json").exists() and not (out / "keep.txt").exists()


def test_missing_source_and_bad_dtype(tmp_path, capsys):
    code, err = _run_cli(["convert", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert code == 2 and "no such directory" in err
    with pytest.raises(QCacheError, match="unsupported dtype"):
        convert_hf(tmp_path, tmp_path / "out", dtype="int8")


def test_interrupt_leaves_nothing(hf_model, tmp_path, monkeypatch):
    import qcache_jax.io.convert as conv

    src = _src(hf_model, tmp_path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "copy_hf_side_files", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_hf(src, out, progress=False)
    _assert_clean(tmp_path, out)


def test_console_script_one_line_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qcache_jax.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
