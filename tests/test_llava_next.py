"""LLaVA-NeXT (anyres): conversion, float32 parity with Hugging Face's
``LlavaNextForConditionalGeneration`` across pinpoint grids, image aspect ratios, backbones and
feature layers; Lazy Attention against the independent reference; decode, generate and ragged
batches of images whose token counts differ."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from qcache_jax import QCacheError, convert_hf, load
from qcache_jax.config import LlavaConfig
from qcache_jax.demo.hf_models import (
    build_hf_llava_next,
    next_processor,
    save_hf,
    tiny_next_config,
    tiny_processor,
    tiny_tokenizer,
)
from qcache_jax.io.hf_config import from_hf_config, to_hf_config
from qcache_jax.nn import anyres
from lazy_reference import lazy_logits_reference
from tiny_models import layout_state_dict, write_state_dict

TOL = 1e-4
IMAGE = 4  # the tiny tokenizer's <image> id

# (height, width) of test pictures: wide, tall, square, smaller than a tile, odd.
WIDE, TALL, SQUARE, SMALL, ODD = (20, 90), (90, 20), (60, 60), (9, 13), (37, 61)

PINPOINTS = {
    # LLaVA-v1.6's [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] scaled to 28 px tiles
    "v1.6": dict(image_grid_pinpoints=((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))),
    # square grids 1x1 .. 3x3
    "square": dict(image_grid_pinpoints=((28, 28), (56, 56), (84, 84))),
    # 42 px CLIP in 14 px patches (3x3 tokens per view), wide and tall grids
    "wide-tall-42px": dict(
        image_size=42, patch_size=14, image_grid_pinpoints=((42, 84), (84, 42), (42, 126), (126, 42), (84, 84))
    ),
}
# The real LLaVA-v1.6-7B geometry (CLIP-L/336, 576 tokens per view): host-side checks only.
V16_336 = dict(
    image_size=336, patch_size=14, image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
)

# Models for the parity test: every pinpoint setting, and the backbones NeXT ships with.
CASES = {
    "v1.6-vicuna-llama-gqa": dict(PINPOINTS["v1.6"]),
    "square-mistral-two-feature-layers": dict(
        PINPOINTS["square"], text_model_type="mistral", vision_feature_layer=[-3, -1], num_kv_heads=4
    ),
    "wide-tall-llama3-rope-tied": dict(
        PINPOINTS["wide-tall-42px"],
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_theta": 500000.0},
        num_kv_heads=1,
        tie_word_embeddings=True,
    ),
    "two-tiles-qwen2-no-projector-bias": dict(
        image_grid_pinpoints=((28, 56), (56, 28)), text_model_type="qwen2", multimodal_projector_bias=False
    ),
}


def _picture(size, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def _encode(proc, rows, *, padding_side="right"):
    """HF processor inputs (numpy) for rows of (text, [picture sizes])."""
    texts, images = [], []
    for i, (text, sizes) in enumerate(rows):
        texts.append("USER: " + "<image> " * len(sizes) + text + " ASSISTANT:")
        images += [_picture(s, seed=10 * i + j) for j, s in enumerate(sizes)]
    proc.tokenizer.padding_side = padding_side
    enc = proc(images=images or None, text=texts, return_tensors="pt", padding=True)
    return {k: v.numpy() for k, v in enc.items()}


def _hf_logits(hf, enc):
    with torch.no_grad():
        return hf(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()


def _convert(hf, path, layout="saved", *, with_processor=False):
    save_hf(hf, path / "hf", with_processor=with_processor)
    if layout != "saved":
        sd = layout_state_dict(hf, layout)
        if layout == "hub":  # llava-hf NeXT checkpoints: a top-level image_newline
            sd["image_newline"] = sd.pop("model.image_newline")
        write_state_dict(sd, path / "hf", "safetensors")
    convert_hf(path / "hf", path / "ckpt", progress=False)
    return load(path / "ckpt")


def _ours(qm, enc, **kw):
    return qm.logits(
        enc["input_ids"], enc.get("pixel_values"), enc["attention_mask"], image_sizes=enc.get("image_sizes"), **kw
    )


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    """(HF LLaVA-NeXT, its processor, converted model): 4 layers, GQA, v1.6-style pinpoints."""
    hf = build_hf_llava_next(seed=31, num_layers=4, **PINPOINTS["v1.6"])
    return hf, tiny_processor(hf), _convert(hf, tmp_path_factory.mktemp("next"), with_processor=True)


# -- the host side: sizes, counts and the packing order equal transformers' ----------------------------------


@pytest.mark.parametrize("name", sorted(PINPOINTS) + ["v1.6-336px"])
def test_counts_and_packing_order_equal_transformers(name):
    """For many image sizes: the views, the token count (LlavaNextProcessor's) and the gather
    index (LlavaNextModel.pack_image_features run on features that carry their own row number)."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    cfg = tiny_next_config(**PINPOINTS.get(name, V16_336))
    hf_cfg = to_hf_config(cfg)
    proc = next_processor(tiny_tokenizer(), cfg)
    tile, s = cfg.vision.image_size, cfg.vision.image_size // cfg.vision.patch_size
    edges = (1, 5, 13, tile - 1, tile, tile + 1, 2 * tile + 3, 100, 333)
    sizes = np.array([(h, w) for h in edges for w in edges])
    feats, first = [], 0
    for h, w in sizes:
        n = anyres.num_views((h, w), cfg)
        best = anyres.select_best_resolution((h, w), cfg.image_grid_pinpoints)
        assert best == select_best_resolution((h, w), hf_cfg.image_grid_pinpoints)
        assert n == image_size_to_num_patches((h, w), hf_cfg.image_grid_pinpoints, tile)
        assert anyres.image_token_count((h, w), cfg) == proc._get_number_of_features(int(h), int(w), tile, tile) - 1
        rows = 1 + first * s * s + torch.arange(n * s * s, dtype=torch.float64)
        feats.append(rows.reshape(n, s * s, 1))
        first += n
    fake = types.SimpleNamespace(config=hf_cfg)
    newline = torch.zeros(1, dtype=torch.float64)  # row 0 of our table
    packed, lens = LlavaNextModel.pack_image_features(fake, feats, torch.tensor(sizes), "default", newline)
    want = torch.cat(packed)[:, 0].numpy().astype(np.int64)
    np.testing.assert_array_equal(anyres.feature_index(sizes, cfg), want)
    assert lens.tolist() == anyres.image_token_counts(sizes, cfg)


# -- conversion ----------------------------------------------------------------------------------------------


def test_config_round_trip_and_old_configs_load():
    cfg = tiny_next_config()
    assert cfg.anyres and from_hf_config(to_hf_config(cfg)) == cfg
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old.pop("image_grid_pinpoints")  # a qcache_config.json written before LLaVA-NeXT
    assert LlavaConfig.from_dict(old).image_grid_pinpoints is None
    with pytest.raises(QCacheError, match="multiple of the vision image_size 28"):
        from_hf_config(to_hf_config(tiny_next_config(image_grid_pinpoints=((28, 40),))))


@pytest.mark.parametrize("layout", ["loaded", "hub"])
def test_key_layouts_and_strictness(next_pair, layout, tmp_path):
    """transformers 5's saved names (image_newline), its loaded names (model.image_newline) and
    the Hub llava-hf layout convert to the same parameters; a missing newline is an error."""
    import jax

    hf, _, qm = next_pair
    other = _convert(hf, tmp_path, layout=layout)
    for a, b in zip(jax.tree.leaves(qm.params), jax.tree.leaves(other.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sd = layout_state_dict(hf, layout)
    sd.pop("model.image_newline")
    write_state_dict(sd, tmp_path / "hf", "safetensors")
    with pytest.raises(QCacheError, match=r"missing \(1\): image_newline"):
        convert_hf(tmp_path / "hf", tmp_path / "bad", progress=False)


# -- float32 parity with Hugging Face ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(name, tmp_path):
    """A batch of four rows, one picture each (wide, tall, square, smaller than a tile), so the
    rows' image-token counts differ (right padding), plus a row with two pictures."""
    hf = build_hf_llava_next(seed=32, num_layers=2, vision_layers=2, **CASES[name])
    qm = _convert(hf, tmp_path)
    enc = _encode(tiny_processor(hf), [("what", [WIDE]), ("is", [TALL]), ("in", [SQUARE, ODD]), ("the", [SMALL])])
    counts = (enc["input_ids"] == IMAGE).sum(1)
    assert len(set(counts.tolist())) == 4  # every row's visual length differs
    keep = enc["attention_mask"].astype(bool)
    err = np.abs(_ours(qm, enc) - _hf_logits(hf, enc))[keep].max()
    assert err <= TOL, f"max |logits - HF| = {err:.3g}"


def test_scan_and_unroll_match_hf(next_pair):
    hf, proc, qm = next_pair
    enc = _encode(proc, [("what is", [ODD]), ("in the image", [SMALL])])
    ref = _hf_logits(hf, enc)
    keep = enc["attention_mask"].astype(bool)
    for loop in ("scan", "unroll"):
        assert np.abs(_ours(qm, enc, loop=loop) - ref)[keep].max() <= TOL


def test_strategy_full_text_matches_and_images_refused(tmp_path):
    """transformers cannot pack a CLIP tower's tiles with the class token kept ('full'): text runs
    exactly, images are refused with a reason rather than computed differently."""
    hf = build_hf_llava_next(seed=33, num_layers=2, vision_layers=2, vision_feature_select_strategy="full")
    qm = _convert(hf, tmp_path)
    ids = np.array([[1, 9, 10, 11, 12, 13]])
    np.testing.assert_allclose(qm.logits(ids), _hf_logits(hf, {"input_ids": ids}), atol=TOL, rtol=0)
    pv = np.zeros((1, 5, 3, 28, 28), np.float32)
    with pytest.raises(QCacheError, match="vision_feature_select_strategy='full'"):
        qm.logits(np.array([[1] + [IMAGE] * 44]), pv, image_sizes=[[28, 28]])


# -- Lazy Attention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_lazy_logits_match_numpy_reference(next_pair, mode):
    """VLA's visual positions are every image-token position: base view, tiles and newlines."""
    hf, proc, qm = next_pair
    enc = _encode(proc, [("what is", [WIDE]), ("in the image", [TALL])])
    lazy = qm.resolve_lazy("1,3").lazy
    ref = lazy_logits_reference(
        hf, enc["input_ids"], enc["pixel_values"], lazy, mode, enc["attention_mask"], enc["image_sizes"]
    )
    out = _ours(qm, enc, lazy="1,3", mode=mode)
    keep = enc["attention_mask"].astype(bool)
    assert np.abs(out - ref)[keep].max() <= TOL
    assert np.abs(out - _ours(qm, enc))[keep].max() > 1e-3  # the lazy layers really change the output


def _row(enc, i):
    """Row ``i`` of processor inputs alone: its tokens (padding removed), its images."""
    keep = enc["attention_mask"][i].astype(bool)
    ids = enc["input_ids"][i][keep]
    first = int(sum((enc["input_ids"][j] == IMAGE).any() for j in range(i)))  # one picture per row here
    if not (ids == IMAGE).any():
        return ids, None, None
    return ids, enc["pixel_values"][first : first + 1], enc["image_sizes"][first : first + 1]


@pytest.mark.parametrize(
    "lazy,mode,loop",
    [(None, "vla", "unroll"), ("1-2", "gla", "unroll"), ("1-2", "vla", "unroll"), ("1,3", "vla", "scan")],
)
def test_decode_equals_full_forward_every_position(next_pair, lazy, mode, loop):
    """A ragged batch (two pictures of different token counts): every generated token's logits
    equal a full forward of the row alone."""
    hf, proc, qm = next_pair
    enc = _encode(proc, [("what is", [WIDE]), ("in", [SQUARE])], padding_side="left")
    res = qm.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
        image_sizes=enc["image_sizes"], lazy=lazy, mode=mode, max_new_tokens=5, return_logits=True,
        eos_token_id=-1, loop=loop,
    )
    for i in range(2):
        ids, pv, sizes = _row(enc, i)
        full = np.concatenate([ids, res.token_ids[i][:-1]])[None]
        ref = qm.logits(full, pv, lazy=lazy, mode=mode, image_sizes=sizes)[0, len(ids) - 1 :]
        np.testing.assert_allclose(res.logits[i], ref, atol=TOL, rtol=0)


def test_greedy_equals_hf_generate(next_pair):
    """A left-padded batch of two pictures with different token counts, as HF batches them."""
    hf, proc, qm = next_pair
    enc = _encode(proc, [("what is in the image ?", [TALL]), ("is", [SQUARE])], padding_side="left")
    with torch.no_grad():
        ref = hf.generate(**{k: torch.tensor(v) for k, v in enc.items()}, max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=3)
    ours = qm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"], max_new_tokens=8,
                       eos_token_id=-1)
    assert ours.token_ids == ref[:, enc["input_ids"].shape[1] :].tolist()


def test_export_round_trip(next_pair, tmp_path):
    """``qcache export`` writes a LlavaNextForConditionalGeneration with the same logits."""
    from transformers import LlavaNextForConditionalGeneration

    from qcache_jax.io.export import export_hf

    _, proc, qm = next_pair
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(export_hf(qm.path, tmp_path / "exported"))).eval()
    enc = _encode(proc, [("what", [WIDE]), ("is", [ODD])])
    keep = enc["attention_mask"].astype(bool)
    assert np.abs(_ours(qm, enc) - _hf_logits(hf, enc))[keep].max() <= TOL


def test_ragged_batch_generates_each_row_as_alone(next_pair):
    """Prompts through the checkpoint's own LlavaNextProcessor: a wide picture, two pictures, no
    picture; each row of the batch generates what it generates alone."""
    _, _, qm = next_pair
    prompts = ["what is in the image ?", "describe", "red"]
    images = [[_picture(WIDE)], [_picture(TALL, 1), _picture(SMALL, 2)], []]
    together = qm.generate(prompts, images, lazy="1-2", mode="vla", max_new_tokens=5, eos_token_id=-1)
    counts = [p.count(IMAGE) for p in together.prompt_token_ids]
    assert counts[0] != counts[1] and counts[2] == 0
    for p, ims, got in zip(prompts, images, together.token_ids):
        assert qm.generate(p, ims, lazy="1-2", mode="vla", max_new_tokens=5, eos_token_id=-1).token_ids[0] == got


def test_no_recompile_for_new_image_sizes_in_bucket(next_pair):
    import jax

    _, _, qm = next_pair
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
    )
    counts, before = [], None
    for size in (SQUARE, (60, 50), (40, 64), (30, 100)):  # other unpadded grids, the same buckets
        res = qm.generate("what is in the image ?", [_picture(size)], max_new_tokens=4)
        counts.append(res.prompt_token_ids[0].count(IMAGE))
        if before is None:  # the first image compiles; the rest must not
            before = len(compiles)
    assert len(compiles) == before, f"recompiled: {compiles[before:]}"
    assert before > 0 and len(set(counts)) == 4, counts  # 88, 72, 70 and 68 image tokens


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_kv_cache_bytes_formula(next_pair, mode):
    """The method.md formulas on the real arrays of a NeXT cache (visual segment: the longest
    row's image tokens, bucketed)."""
    _, proc, qm = next_pair
    enc = _encode(proc, [("what is", [SQUARE])])
    res = qm.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"],
                      lazy="1-3", mode=mode, max_new_tokens=4)
    prompt = enc["input_ids"][0].tolist()
    layout = qm.engine().plan([prompt], [1], schedule=qm.resolve_lazy("1-3", mode), max_new_tokens=4).layout
    assert layout.image_len >= prompt.count(IMAGE) > 16
    share = 1.0 if mode == "gla" else layout.image_len / (layout.image_len + layout.text_len)
    assert res.kv_cache_bytes / res.dense_kv_cache_bytes == pytest.approx(1 - 3 / 8 * share, abs=1e-12)


def test_bad_inputs(next_pair):
    _, proc, qm = next_pair
    enc = _encode(proc, [("what is", [WIDE])])
    ids, pv, sizes = enc["input_ids"], enc["pixel_values"], enc["image_sizes"]
    with pytest.raises(QCacheError, match="needs image_sizes"):
        qm.logits(ids, pv)
    with pytest.raises(QCacheError, match="image tokens do not match"):
        qm.logits(ids, pv, image_sizes=[[90, 20]])
    with pytest.raises(QCacheError, match="needs 5"):
        qm.logits(ids, pv[:, :2], image_sizes=[[60, 60]])
    with pytest.raises(QCacheError, match=r"must be \[N, views, 3, 28, 28\]"):
        qm.logits(ids, pv[..., :20], image_sizes=sizes)
