"""benchmarks.retention's arithmetic, checked against the real cache layout's array sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qcache_jax.demo.hf_models import tiny_config
from qcache_jax.lazy.cache import CacheLayout, layout_kv_bytes
from qcache_jax.lazy.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import retention  # noqa: E402


def _saved(cfg, schedule, image_len: int, text_len: int) -> float:
    kv, dense = layout_kv_bytes(CacheLayout(batch=2, image_len=image_len, text_len=text_len, schedule=schedule),
                                cfg.text, cfg.dtype)
    return 1.0 - kv / dense


@pytest.mark.parametrize("n_lazy,image_len,text_len", [(7, 16, 24), (5, 64, 67), (3, 9, 40)])
def test_vla_saving_needed_matches_real_arrays(n_lazy, image_len, text_len):
    cfg = tiny_config(num_layers=8)
    schedule = Schedule.from_layers(range(1, 1 + n_lazy), 8, "vla")
    need = retention.saving_needed(_saved(cfg, schedule, image_len, text_len), n_lazy, 8, image_len)
    assert need["text_tokens"] == pytest.approx(text_len, rel=1e-9)
    assert need["max_saving"] == pytest.approx(n_lazy / 16)
    tokens = need["image_tokens_needed"]
    if n_lazy / 16 <= 0.35:  # even an all-visual cache saves at most n_lazy/(2L)
        assert tokens is None
    else:
        assert _saved(cfg, schedule, tokens, text_len) >= 0.35 - 1e-12
        assert _saved(cfg, schedule, tokens - 1, text_len) < 0.35


def test_parse_tune():
    assert retention.parse_tune("gla:0.5, vla:max", 30) == [("gla", 0.5, "0.5"), ("vla", 29 / 30, "max")]
    with pytest.raises(SystemExit, match="MODE:FRACTION"):
        retention.parse_tune("fast:0.5", 30)


def test_memo_and_divergences_are_read_back(tmp_path):
    import numpy as np

    from qcache_jax.tools.calibrate import Divergence

    calls = []
    memo = retention.Memo(tmp_path, "ckpt-a")
    compute = lambda: calls.append(1) or {"all": 0.5}
    assert memo("accuracy dense", compute) == {"all": 0.5} == memo("accuracy dense", compute)
    assert len(calls) == 1
    assert retention.Memo(tmp_path, "ckpt-b")("accuracy dense", lambda: 7) == 7  # another checkpoint: measured
    rng = np.random.default_rng(0)
    made = {m: Divergence(rng.random((2, 3, 3, 4)), rng.random((2, 3, 3))) for m in retention.MODES}
    path = tmp_path / "div.npz"
    assert retention.divergences(path, lambda: made) is made
    back = retention.divergences(path, lambda: pytest.fail("measured again"))
    for m in retention.MODES:
        assert np.array_equal(back[m].heads, made[m].heads) and np.array_equal(back[m].averaged, made[m].averaged)
