"""Shared fixtures: tiny random HF LLaVA models built locally (no downloads)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import build_hf_llava, make_inputs, save_hf  # noqa: E402,F401


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny GQA Llama-backbone LLaVA saved by transformers, with a tokenizer and processor."""
    d = tmp_path_factory.mktemp("tiny_hf")
    model = build_hf_llava()
    save_hf(model, d, with_processor=True)
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_hf_dir, tmp_path_factory):
    from qcache_jax import convert_hf

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    convert_hf(tiny_hf_dir, out, progress=False)
    return out


def read_json(p: Path):
    return json.loads(Path(p).read_text())


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A generated 40x40 picture on disk."""
    from qcache_jax.demo.pictures import demo_image

    p = tmp_path_factory.mktemp("img") / "pic.png"
    demo_image(size=40, seed=3).save(p)
    return p


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``qcache ARGV`` run in this process."""
    from qcache_jax import cli

    capsys.readouterr()
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err
