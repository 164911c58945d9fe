"""The `qcache generate` command line and streaming, on a tiny checkpoint with a tokenizer and processor."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from qcache_jax import QCacheError, load

PROMPT = "what color is the circle ?"


def _run(argv, capsys):
    return run_cli(argv, capsys)


def test_generate_json_has_every_field(tiny_ckpt, image_path, capsys):
    argv = ["generate", str(tiny_ckpt), "--prompt", PROMPT, "--image", str(image_path)]
    code, out, _ = _run(argv + ["--lazy", "1-2", "--mode", "gla", "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0
    data = json.loads(out)  # exactly one JSON object on stdout
    for field in (
        "text",
        "token_ids",
        "prompt_token_ids",
        "kv_cache_bytes",
        "dense_kv_cache_bytes",
        "prefill_seconds",
        "decode_tokens_per_second",
        "lazy_layers",
        "mode",
    ):
        assert field in data, field
    assert data["lazy_layers"] == [1, 2] and data["mode"] == "gla"
    assert data["kv_cache_bytes"] / data["dense_kv_cache_bytes"] == pytest.approx(1 - 2 / (2 * 4))
    model = load(tiny_ckpt)
    ref = model.generate(PROMPT, [image_path], lazy="1-2", mode="gla", max_new_tokens=5)
    assert data["token_ids"] == ref.token_ids[0] and data["prompt_token_ids"] == ref.prompt_token_ids[0]
    # the chat template put one image placeholder, expanded to the image's tokens
    assert data["prompt_token_ids"].count(model.config.image_token_id) == model.config.image_tokens_per_image


def test_human_output_and_stream_agree(tiny_ckpt, image_path, capsys):
    base = ["generate", str(tiny_ckpt), "--prompt", PROMPT, "--image", str(image_path), "--max-new-tokens", "6"]
    code, out, _ = _run(base, capsys)
    assert code == 0 and "tokens/s" in out and "KV cache" in out
    text = out.splitlines()[0]
    code, streamed, _ = _run(base + ["--stream"], capsys)
    lines = streamed.strip().splitlines()
    assert code == 0 and lines[0].strip() == text.strip()
    assert len(lines) == 2 and "tokens/s" in lines[1] and "KV cache" in lines[1]  # the stats, after the text


def test_stream_equals_generate(tiny_ckpt, image_path):
    model = load(tiny_ckpt)
    for lazy, mode in ((None, "vla"), ("1-3", "gla"), ("2-3", "vla")):
        ref = model.generate(PROMPT, [image_path], lazy=lazy, mode=mode, max_new_tokens=7, eos_token_id=-1)
        steps = list(model.stream(PROMPT, [image_path], lazy=lazy, mode=mode, max_new_tokens=7, eos_token_id=-1))
        assert [s[0] for s in steps] == ref.token_ids[0]
    with pytest.raises(TypeError, match="unexpected"):
        next(model.stream(PROMPT, [image_path], bogus=1))


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--image", "/nonexistent/pic.png"], "image not found"),
        (["--lazy", "0-1"], "layer 0 cannot be lazy"),
        (["--lazy", "auto"], "no schedule.json"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_generate_errors_are_one_line(tiny_ckpt, extra, needle, capsys):
    code, out, err = _run(["generate", str(tiny_ckpt), "--prompt", PROMPT] + extra, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and out == ""


def test_not_a_checkpoint(tmp_path, capsys):
    code, _, err = _run(["generate", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2 and "not a qcache checkpoint" in err
    with pytest.raises(QCacheError, match="no such checkpoint"):
        load(tmp_path / "missing")
