"""What a new user hit (issue 11): export -> convert, context limits, one-line errors, progress
messages, file permissions, CLI help and options. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import run_cli

from qcache_jax import QCacheError, cli, convert_hf, load

PROMPT = "what color is the circle ?"


def _run(argv, capsys):
    return run_cli(argv, capsys)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- 1. export -> convert round trip ---------------------------------------------------------


def test_export_then_convert_round_trip(tiny_ckpt, tmp_path, rng):
    from transformers import LlavaForConditionalGeneration

    from qcache_jax.io.export import export_hf

    exported = export_hf(tiny_ckpt, tmp_path / "hf")
    # What the exporter writes names vision weights model.vision_tower.vision_model.*: two
    # prefix rewrites, which the converter used to stop after the first of.
    back = load(convert_hf(exported, tmp_path / "back", progress=False))
    orig = load(tiny_ckpt)
    for a, b in zip(jax.tree.leaves(orig.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and what transformers itself saves after loading the export.
    resaved = tmp_path / "resaved"
    LlavaForConditionalGeneration.from_pretrained(str(exported)).save_pretrained(str(resaved))
    again = load(convert_hf(resaved, tmp_path / "again", progress=False))
    ids = np.array([[1, 5, 6] + [orig.config.image_token_id] * orig.config.image_tokens_per_image + [7, 8]])
    pv = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(orig.logits(ids, pv), again.logits(ids, pv))
    # The exported safetensors file has the umask's permissions, not 0600.
    assert (exported / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


# -- 2. context limit ------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused_before_allocating(tiny_ckpt):
    model = load(tiny_ckpt)
    context = model.config.text.max_position_embeddings
    long_ids = np.full((1, context + 10), 5)
    with pytest.raises(QCacheError, match=f"prompt of {context + 10} tokens plus 1 new tokens exceeds the model's context of {context}"):
        model.generate(input_ids=long_ids, max_new_tokens=1)
    with pytest.raises(QCacheError, match="at most .* new tokens fit"):
        model.generate(input_ids=np.full((1, 20), 5), max_new_tokens=10_000_000)
    # The user may raise the limit explicitly.
    out = model.generate(input_ids=np.full((1, 20), 5), max_new_tokens=3, max_context=context + 1000)
    assert len(out.token_ids[0]) <= 3


def test_huge_max_new_tokens_cli_is_one_line(tiny_ckpt, capsys):
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--max-new-tokens", "10000000", "--quiet"], capsys)
    assert code == 2 and "exceeds the model's context" in err and len(err.strip().splitlines()) == 1 and out == ""


# -- 3. one resolver for (lazy, mode) ----------------------------------------------------------


def test_eval_lazy_auto_takes_the_recorded_mode(tiny_ckpt, tmp_path, image_path, capsys):
    import shutil

    from qcache_jax.lazy.schedule import SCHEDULE_FILE, Schedule

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    Schedule.from_layers([1, 2], 4, "gla").write(ckpt / SCHEDULE_FILE)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": str(image_path), "question": PROMPT, "answer": "red"}) + "\n")
    code, out, _ = _run(["eval", str(ckpt), "--data", str(data), "--lazy", "auto", "--json", "--quiet"], capsys)
    assert code == 0 and json.loads(out)["mode"] == "gla"
    code, out, _ = _run(["eval", str(ckpt), "--data", str(data), "--lazy", "auto", "--mode", "vla", "--json", "--quiet"], capsys)
    assert json.loads(out)["mode"] == "vla"  # an explicit mode wins
    assert load(ckpt).generate(PROMPT, image_path, lazy="auto", max_new_tokens=2).mode == "gla"


# -- 4, 5, 11, 12. one-line errors from the API and the CLI ------------------------------------------


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--prompt", "<image> " + PROMPT, "--image", "IMG"], "2 image placeholder(s)"),
        (["--prompt", PROMPT, "--image", "IMG", "--raw"], "0 image placeholder(s)"),
        (["--prompt", PROMPT, "--top-p", "0"], "top_p must be in (0, 1], got 0"),
        (["--prompt", PROMPT, "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", PROMPT, "--top-k", "-2"], "top_k must be >= 0"),
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", PROMPT, "--stream", "--json"], "cannot be combined"),
    ],
)
def test_generate_errors_are_one_line(tiny_ckpt, image_path, extra, needle, capsys):
    argv = ["generate", str(tiny_ckpt)] + [str(image_path) if a == "IMG" else a for a in extra]
    code, out, err = _run(argv + ["--quiet"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and out == "", err


def test_api_takes_a_single_image_path_and_raises_its_own_error(tiny_ckpt, image_path):
    model = load(tiny_ckpt)
    one = model.generate(PROMPT, str(image_path), max_new_tokens=3)
    listed = model.generate(PROMPT, [str(image_path)], max_new_tokens=3)
    assert one.token_ids == listed.token_ids
    with pytest.raises(QCacheError, match="image placeholder"):
        model.generate("<image> " + PROMPT, [image_path], max_new_tokens=2)
    with pytest.raises(QCacheError, match="empty"):
        model.generate("", max_new_tokens=2)


def test_truncated_params_file_is_one_line_every_time(tiny_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, ckpt)
    biggest = max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    for _ in range(3):  # the asyncio noise at exit came in some runs only
        r = subprocess.run(
            [sys.executable, "-m", "qcache_jax.cli", "generate", str(ckpt), "--prompt", PROMPT, "--quiet"],
            capture_output=True, text=True, timeout=300,
        )
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "truncated or damaged" in r.stderr, r.stderr


def test_out_of_memory_is_one_line(tiny_ckpt, monkeypatch, capsys):
    from qcache_jax.api import QCacheModel

    def oom(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 18.0GiB")

    monkeypatch.setattr(QCacheModel, "generate", oom)
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--quiet"], capsys)
    assert code == 2 and "out of memory" in err and len(err.strip().splitlines()) == 1


# -- 7, 8. progress on stderr, --quiet, --stream statistics -----------------------------------


def test_progress_messages_and_quiet(tiny_ckpt, capsys):
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--max-new-tokens", "33"], capsys)
    assert code == 0 and "loading" in err and "compiling" in err and "compiling" not in out
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--max-new-tokens", "33", "--quiet"], capsys)
    assert code == 0 and err == ""


def test_stats_to_stderr(tiny_ckpt, capsys):
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--stats-to-stderr", "--quiet"], capsys)
    assert code == 0 and "tokens/s" in err and "tokens/s" not in out
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--stream", "--stats-to-stderr", "--quiet"], capsys)
    assert code == 0 and "tokens/s" in err


# -- 9. permissions ------------------------------------------------------------------------------


def test_calibration_outputs_respect_the_umask(tiny_ckpt, tmp_path):
    from qcache_jax.demo.pictures import write_calibration_data
    from qcache_jax.tools.calibrate import calibrate

    data = write_calibration_data(tmp_path / "cal", n_images=1)
    res = calibrate(tiny_ckpt, data, lazy_fraction=0.25, out=tmp_path / "s.json", plot=tmp_path / "s.png",
                    max_samples=1, progress=False)
    for p in (res.schedule_path, res.plot_path):
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask(), p


# -- 10. --version, --help -------------------------------------------------------------------------


def test_version_and_help(capsys):
    from qcache_jax import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    for command in ("generate", "bench", "eval", "calibrate", "convert", "tune"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert text.count("usage:") == 1 and "``" not in text, command
        assert "(default:" in text, command


def test_lazy_layers_print_in_one_format(tiny_ckpt, image_path, capsys):
    code, out, _ = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--lazy", "1,2-3", "--mode", "gla", "--quiet"], capsys)
    assert code == 0 and "lazy layers 1-3 (gla)" in out
    code, out, _ = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--quiet"], capsys)
    assert "lazy layers none (dense)" in out
