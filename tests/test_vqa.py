"""The synthetic VQA data (deterministic, balanced), its tokenizer, and `eval` on JSONL files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from qcache_jax import QCacheError, load
from qcache_jax.demo import synthetic_vqa as vqa_data
from qcache_jax.tools.vqa import normalize_answer, write_jsonl
from qcache_jax.tools.evaluate import evaluate, load_records
from qcache_jax.demo.train_demo import demo_model
from qcache_jax.tools.train import init_params, write_checkpoint
from qcache_jax.cli import build_parser

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2, vision_hidden=32,
            vision_layers=2, vision_heads=4, image_size=32, patch_size=8)


def test_generator_is_deterministic():
    a, b = vqa_data.examples(7, 100, 12), vqa_data.examples(7, 100, 12)
    for x, y in zip(a, b):
        assert (x.question, x.answer, x.kind, x.attributes) == (y.question, y.answer, y.kind, y.attributes)
        np.testing.assert_array_equal(np.asarray(x.image), np.asarray(y.image))
    # Splits are different seeds: different scenes.
    test, val = vqa_data.split("test", 8), vqa_data.split("validation", 8)
    assert any(not np.array_equal(np.asarray(t.image), np.asarray(v.image)) for t, v in zip(test, val))
    assert np.asarray(a[0].image).shape == (64, 64, 3)


def test_questions_are_balanced_and_answers_consistent():
    exs = vqa_data.examples(0, 0, 400)
    kinds = Counter(e.kind for e in exs)
    assert set(kinds.values()) == {100}
    yn = Counter(e.answer for e in exs if e.kind == "yesno")
    assert yn["yes"] == yn["no"] == 50
    for e in exs:
        a = e.attributes
        if e.kind == "color":
            assert e.answer == a["color"]
        elif e.kind == "shape":
            assert e.answer == a["shape"]
        elif e.kind == "where":
            assert e.answer == a["position"]
        else:
            asked = e.question.split()[-2]
            assert (e.answer == "yes") == (asked in (a["color"], a["shape"]))


def test_rendered_colour_is_the_answer():
    e = vqa_data.example(3, 0)
    px = np.asarray(e.image).reshape(-1, 3).astype(int)
    rgb = np.array(vqa_data.COLORS[e.attributes["color"]])
    assert (np.abs(px - rgb).sum(1) < 10).sum() > 50  # a solid patch of the shape's colour


def test_tokenizer_knows_every_word_and_round_trips():
    tok = vqa_data.build_tokenizer()
    for e in vqa_data.examples(0, 0, 64):
        ids = tok(f"{e.question} {e.answer}")["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(tok(e.answer, add_special_tokens=False)["input_ids"]) == e.answer
    assert tok("What colour is the shape?")["input_ids"] == tok("what colour is the shape ?")["input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where is the shape ?"}]}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nwhere is the shape ? ASSISTANT:"


def test_normalize_answer():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("yes!") == "yes"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An untrained tiny model with the VQA tokenizer and a 32-pixel processor."""
    hf_cfg, cfg, processor = demo_model(**TINY)
    out = tmp_path_factory.mktemp("vqa_eval") / "ckpt"
    write_checkpoint(out, cfg, init_params(cfg, 3), processor, hf_config=hf_cfg)
    return out


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vqa_jsonl")
    write_jsonl(d, vqa_data.split("test", 10), name="test.jsonl", calibration_name="calib.jsonl")
    return d


def _cli(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_eval_on_tiny_jsonl(tiny_ckpt, eval_dir, tmp_path, capsys):
    model = load(tiny_ckpt)
    res = evaluate(model, eval_dir / "test.jsonl", batch_size=4, max_new_tokens=3)
    assert res.n == 10 and len(res.predictions) == 10 and res.mode == "dense"
    assert res.correct == sum(p["correct"] for p in res.predictions)
    # Make the model's own greedy answers the gold answers: the scorer must then give 1.0.
    own = tmp_path / "own.jsonl"
    lines = [json.loads(l) for l in (eval_dir / "test.jsonl").read_text().splitlines()]
    for line, p in zip(lines, res.predictions):
        line["answer"], line["image"] = p["prediction"], str(eval_dir / line["image"])
    own.write_text("".join(json.dumps(l) + "\n" for l in lines))
    again = evaluate(model, own, batch_size=4, max_new_tokens=3)
    assert again.accuracy == 1.0
    # The CLI handler, with a lazy schedule, prints one JSON object with --json.
    assert _cli(["eval", str(tiny_ckpt), "--data", str(own), "--lazy", "1-3", "--mode", "gla", "--batch-size", "4",
                 "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 10 and out["lazy_layers"] == [1, 2, 3] and out["mode"] == "gla" and 0 <= out["accuracy"] <= 1
    assert out["kv_cache_bytes"] < out["dense_kv_cache_bytes"]
    assert out["fastv"] is None
    # FastV on top is recorded with the result; the lazy block straddling its layer is cut there
    assert _cli(["eval", str(tiny_ckpt), "--data", str(own), "--lazy", "1-3", "--mode", "gla", "--batch-size", "4",
                 "--max-new-tokens", "3", "--json", "--fastv", "1:0.5"]) == 0
    fv = json.loads(capsys.readouterr().out)
    assert fv["fastv"] == "1:0.5" and fv["lazy_layers"] == [1, 3] and fv["kv_cache_bytes"] != out["kv_cache_bytes"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "images/00000.png", "question": "what shape is it ?"}\n', "missing field 'answer'"),
        ('{"question": "q", "answer": "a"}\n', "missing field 'image'"),
        ('{"image": "nope.png", "question": "q", "answer": "a"}\n', "image .*nope.png not found"),
        ('{"image": "images/00000.png", "question": "q", "answer": "a"}\n{not json\n', r":2: not valid JSON"),
        ('["image", "question"]\n', "expected a JSON object"),
        ('{"image": "images/00000.png", "question": 3, "answer": "a"}\n', "'question' must be a non-empty string"),
        ("\n\n", "no examples"),
    ],
)
def test_bad_eval_files_give_clear_errors(eval_dir, content, message):
    bad = eval_dir / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(QCacheError, match=message):
        load_records(bad)


def test_eval_cli_errors(tiny_ckpt, eval_dir):
    with pytest.raises(QCacheError, match="evaluation file not found"):
        _cli(["eval", str(tiny_ckpt), "--data", str(eval_dir / "missing.jsonl")])
    with pytest.raises(QCacheError, match="is a directory"):
        _cli(["eval", str(tiny_ckpt), "--data", str(eval_dir)])
    (eval_dir / "broken.png").write_bytes(b"not a png")
    (eval_dir / "broken.jsonl").write_text('{"image": "broken.png", "question": "q", "answer": "a"}\n')
    with pytest.raises(QCacheError, match="cannot read image"):
        _cli(["eval", str(tiny_ckpt), "--data", str(eval_dir / "broken.jsonl")])
