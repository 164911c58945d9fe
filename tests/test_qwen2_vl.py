"""Qwen2-VL and Qwen2.5-VL against transformers: converted tiny random models give HF's logits
(images of several sizes, two images in one prompt, text only, a batch of two sizes), M-RoPE
positions equal ``get_rope_index``, and lazy schedules equal a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcache_jax.errors import QCacheError
from tiny_models import converted

VOCAB = 160
IMAGE, VIDEO, START, END = 151, 152, 153, 154
TOL = 1e-4  # float32 logits, max abs difference


def _hf_config(family: str, layers: int = 4, vocab: int = VOCAB):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=16,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def _hf_model(family: str, seed: int = 0, vocab: int = VOCAB):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(_hf_config(family, vocab=vocab)).eval()
    with torch.no_grad():  # random init leaves some biases/norms at 0/1: perturb all so every tensor matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    return request.param, hf, converted(hf, tmp_path_factory.mktemp(request.param))


def _row(rng, grids, n_text=6):
    """A prompt: text, then per image <start> pads <end> and more text."""
    row = [int(t) for t in rng.integers(3, 150, size=3)]
    for t, h, w in grids:
        row += [START] + [IMAGE] * (t * h * w // 4) + [END] + [int(x) for x in rng.integers(3, 150, size=n_text)]
    return row


def _pixels(rng, grids):
    n = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((n, 3 * 2 * 4 * 4)).astype(np.float32), np.asarray(grids, np.int64)


def _hf_logits(hf, ids, mask=None, pv=None, grid=None):
    kw = {"input_ids": torch.tensor(ids)}
    kw["mm_token_type_ids"] = torch.tensor((np.asarray(ids) == IMAGE).astype(np.int64))
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pv is not None:
        kw["pixel_values"], kw["image_grid_thw"] = torch.tensor(pv), torch.tensor(grid)
    with torch.no_grad():
        return hf(**kw).logits.float().numpy()


@pytest.mark.parametrize("grids", [[(1, 4, 4)], [(1, 6, 8)], [(1, 8, 6)], [(1, 10, 14)], [(1, 4, 6), (1, 8, 4)]],
                         ids=["4x4", "6x8", "8x6", "10x14", "two-images"])
def test_logits_match_hf(pair, grids):
    _, hf, ours = pair
    rng = np.random.default_rng(0)
    ids = np.asarray([_row(rng, grids)])
    pv, grid = _pixels(rng, grids)
    want = _hf_logits(hf, ids, pv=pv, grid=grid)
    got = ours.logits(ids, pv, image_grid_thw=grid)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL


def test_text_only_matches_hf(pair):
    _, hf, ours = pair
    ids = np.random.default_rng(1).integers(3, 150, size=(2, 11))
    assert np.abs(ours.logits(ids) - _hf_logits(hf, ids)).max() <= TOL


def test_batch_of_two_image_sizes_left_padded(pair):
    """Rows with images of different sizes, left-padded to one length with an attention mask."""
    _, hf, ours = pair
    rng = np.random.default_rng(2)
    g0, g1 = [(1, 4, 4)], [(1, 6, 8)]
    r0, r1 = _row(rng, g0), _row(rng, g1)
    t = max(len(r0), len(r1))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    for i, r in enumerate((r0, r1)):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    pv, grid = _pixels(rng, g0 + g1)
    want = _hf_logits(hf, ids, mask, pv, grid)
    got = ours.logits(ids, pv, mask, image_grid_thw=grid)
    m = mask.astype(bool)
    assert np.abs(got[m] - want[m]).max() <= TOL


def test_rope_index_matches_hf(pair):
    from qcache_jax.nn.mrope import rope_index

    _, hf, _ = pair
    rng = np.random.default_rng(3)
    grids = [(1, 4, 6), (1, 8, 4), (1, 6, 6)]
    r0, r1 = _row(rng, grids[:2]), _row(rng, grids[2:], n_text=9)
    t = max(len(r0), len(r1)) + 2
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    ids[0, : len(r0)], mask[0, : len(r0)] = r0, 1  # right padded
    ids[1, t - len(r1):], mask[1, t - len(r1):] = r1, 1  # left padded
    want, delta = hf.model.get_rope_index(torch.tensor(ids), torch.tensor((ids == IMAGE).astype(np.int64)),
                                          image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    got, nxt = rope_index(ids, mask.astype(bool), np.asarray(grids), image_token_id=IMAGE, spatial_merge_size=2)
    m = mask.astype(bool)
    assert np.array_equal(got[:, m], want.numpy()[:, m])
    np.testing.assert_array_equal(nxt, (delta.numpy()[:, 0] + m.sum(1)))


def test_mismatched_inputs_are_refused(pair):
    _, _, ours = pair
    rng = np.random.default_rng(4)
    ids = np.asarray([_row(rng, [(1, 4, 4)])])
    pv, grid = _pixels(rng, [(1, 4, 4)])
    with pytest.raises(QCacheError, match="image tokens"):
        ours.logits(ids, *_pixels(rng, [(1, 4, 8)])[:1], image_grid_thw=np.asarray([(1, 4, 8)]))
    with pytest.raises(QCacheError, match="image_grid_thw"):
        ours.logits(ids, pv)
    with pytest.raises(QCacheError, match="image_sizes"):
        ours.logits(ids, pv, image_grid_thw=grid, image_sizes=np.asarray([[8, 8]]))
    vpv, vgrid = _pixels(rng, [(2, 4, 4)])
    with pytest.raises(QCacheError, match="video"):
        ours.logits(np.asarray([_row(rng, [(2, 4, 4)])]), vpv, image_grid_thw=vgrid)


# -- Lazy Attention, decode and generate on the family ------------------------------------------


@pytest.fixture(scope="module")
def lazy_pair(tmp_path_factory):
    """(HF Qwen2.5-VL, converted) with 6 decoder layers: enough for two lazy blocks."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = _hf_config("qwen2_5_vl", layers=6)
    torch.manual_seed(5)
    hf = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf, converted(hf, tmp_path_factory.mktemp("qwen_lazy"))


def _batch(rng, grids_per_row):
    rows = [_row(rng, g) for g in grids_per_row]
    t = max(len(r) for r in rows)
    if any(len(r) != t for r in rows):
        rows = [r + [int(x) for x in rng.integers(3, 150, size=t - len(r))] for r in rows]
    pv, grid = _pixels(rng, [g for gs in grids_per_row for g in gs])
    return np.asarray(rows), pv, grid


@pytest.mark.parametrize("mode", ["gla", "vla"])
@pytest.mark.parametrize("spec", ["1", "1-2,4-5", "2-5"])
def test_lazy_logits_match_numpy_reference(lazy_pair, mode, spec):
    from lazy_reference import lazy_logits_reference

    hf, qm = lazy_pair
    ids, pv, grid = _batch(np.random.default_rng(6), [[(1, 4, 6)], [(1, 6, 4)]])
    lazy = qm.resolve_lazy(spec).lazy
    ref = lazy_logits_reference(hf, ids, pv, lazy, mode, image_grid_thw=grid)
    out = qm.logits(ids, pv, lazy=spec, mode=mode, image_grid_thw=grid)
    assert np.abs(out - ref).max() <= TOL
    assert np.abs(out - qm.logits(ids, pv, image_grid_thw=grid)).max() > 1e-3  # the schedule matters


def _check_decode_vs_forward(qm, ids, pv, grid, lazy, mode, per_row, **kw):
    """Prefill + decode (M-RoPE prompt positions, then the text positions after them) equal
    the full forward over prompt + generated tokens at every generated position."""
    res = qm.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, lazy=lazy, mode=mode, max_new_tokens=6,
                      return_logits=True, eos_token_id=-1, **kw)
    for row in range(ids.shape[0]):
        gs = per_row[row]
        n = sum(t * h * w for t, h, w in gs)
        start = sum(t * h * w for gs2 in per_row[:row] for t, h, w in gs2)
        full = np.concatenate([ids[row], res.token_ids[row][:-1]])[None]
        ref = qm.logits(full, pv[start:start + n] if n else None, lazy=lazy, mode=mode,
                        image_grid_thw=np.asarray(gs) if gs else None)[0, ids.shape[1] - 1:]
        np.testing.assert_allclose(res.logits[row], ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("1-2,4", "gla"), ("1-2,4", "vla")])
def test_decode_equals_full_forward_every_position(lazy_pair, lazy, mode):
    _, qm = lazy_pair
    per_row = [[(1, 4, 6)], [(1, 6, 8), (1, 4, 4)]]
    ids, pv, grid = _batch(np.random.default_rng(7), per_row)
    _check_decode_vs_forward(qm, ids, pv, grid, lazy, mode, per_row)


def test_single_prompt_decode_equals_full_forward(lazy_pair):
    _, qm = lazy_pair
    per_row = [[(1, 8, 6)]]
    ids, pv, grid = _batch(np.random.default_rng(8), per_row)
    _check_decode_vs_forward(qm, ids, pv, grid, "1-3", "vla", per_row)


@pytest.mark.parametrize("with_image", [True, False])
def test_dense_greedy_equals_hf_generate(lazy_pair, with_image):
    hf, qm = lazy_pair
    rng = np.random.default_rng(9)
    if with_image:
        ids, pv, grid = _batch(rng, [[(1, 6, 8)]])
    else:
        ids, pv, grid = rng.integers(3, 150, size=(1, 9)), None, None
    kw = {"input_ids": torch.tensor(ids), "mm_token_type_ids": torch.tensor((ids == IMAGE).astype(np.int64))}
    if pv is not None:
        kw["pixel_values"], kw["image_grid_thw"] = torch.tensor(pv), torch.tensor(grid)
    with torch.no_grad():
        ref = hf.generate(**kw, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = qm.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, max_new_tokens=10, eos_token_id=-1)
    assert ours.token_ids[0] == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("mode", ["gla", "vla"])
def test_kv_cache_bytes_formula(lazy_pair, mode):
    """The saving on the real cache arrays: GLA drops a lazy layer's K everywhere, VLA its
    visual K only (the image-pad positions)."""
    _, qm = lazy_pair
    ids, pv, grid = _batch(np.random.default_rng(10), [[(1, 6, 8)]])
    res = qm.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, lazy="1-3,5", mode=mode, max_new_tokens=4)
    layout = qm.engine().plan([ids[0].tolist()], [0], schedule=qm.resolve_lazy("1-3,5", mode), max_new_tokens=4).layout
    share = 1.0 if mode == "gla" else layout.image_len / (layout.image_len + layout.text_len)
    assert res.kv_cache_bytes / res.dense_kv_cache_bytes == pytest.approx(1 - 4 / (2 * 6) * share, abs=1e-12)
    assert layout.image_len >= 12  # the 12 merged tokens of a 6x8 patch grid


def test_no_recompile_for_new_images_in_bucket(lazy_pair):
    """Images of other sizes within the same patch and token buckets reuse the compiled plan."""
    import jax

    _, qm = lazy_pair
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
    )
    rng = np.random.default_rng(11)
    ids, pv, grid = _batch(rng, [[(1, 6, 8)]])
    qm.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, lazy="1-2", mode="vla", max_new_tokens=5)
    before = len(compiles)
    for g in ((1, 8, 6), (1, 4, 10)):
        ids, pv, grid = _batch(rng, [[g]])
        qm.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, lazy="1-2", mode="vla", max_new_tokens=5)
    assert len(compiles) == before, f"recompiled: {compiles[before:]}"
    assert before > 0


# -- conversion and export ---------------------------------------------------------------------


def _hub_layout(sd: dict) -> dict:
    """The names the Qwen2-VL checkpoints on the Hub use (saved before transformers 4.52):
    model.layers.*, model.embed_tokens, model.norm, visual.*, lm_head."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        out[k] = v
    return out


def test_convert_hub_layout_and_refuse_mismatch(pair, tmp_path):
    from tiny_models import write_state_dict

    from qcache_jax import convert_hf, load

    family, hf, ours = pair
    src = tmp_path / "hub"
    hf.config.save_pretrained(str(src))
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    write_state_dict(_hub_layout(sd), src, "safetensors")
    qm = load(convert_hf(src, tmp_path / "ckpt", progress=False))
    rng = np.random.default_rng(12)
    ids = np.asarray([_row(rng, [(1, 6, 4)])])
    pv, grid = _pixels(rng, [(1, 6, 4)])
    np.testing.assert_array_equal(qm.logits(ids, pv, image_grid_thw=grid), ours.logits(ids, pv, image_grid_thw=grid))
    # strict: a missing vision tensor and a misshapen merger are both named
    bad = _hub_layout(sd)
    del bad["visual.blocks.0.attn.qkv.weight"]
    bad["visual.merger.mlp.2.bias"] = torch.zeros(3)
    write_state_dict(bad, src, "safetensors")
    with pytest.raises(QCacheError, match=r"missing \(1\): visual.blocks.0.attn.qkv.weight.*misshapen"):
        convert_hf(src, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_config_round_trip(pair):
    from qcache_jax.io.hf_config import from_hf_config, to_hf_config

    _, hf, ours = pair
    assert from_hf_config(to_hf_config(ours.config), dtype="float32") == ours.config
    assert from_hf_config(hf.config) == ours.config


def test_export_loads_in_transformers_with_equal_logits(pair, tmp_path):
    from transformers import AutoModelForImageTextToText

    from qcache_jax.io.export import export_hf

    family, hf, ours = pair
    out = export_hf(ours.path, tmp_path / "exported")
    back = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(back) is type(hf)
    rng = np.random.default_rng(13)
    grids = [(1, 4, 6), (1, 8, 8)]
    ids = np.asarray([_row(rng, grids)])
    pv, grid = _pixels(rng, grids)
    assert np.abs(_hf_logits(back, ids, pv=pv, grid=grid) - ours.logits(ids, pv, image_grid_thw=grid)).max() <= TOL


# -- the processor glue: prompts with images, calibrate, eval ----------------------------------

SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|> "
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def _tokenizer():
    """A word-level tokenizer whose specials sit at the tiny config's ids (image pad = 151)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(147)]
    vocab = {w: i for i, w in enumerate(words + SPECIAL + ["user", "assistant", "what", "shape"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = TEMPLATE
    assert fast.convert_tokens_to_ids("<|image_pad|>") == IMAGE
    return fast


def _image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=40 * 40, patch_size=4, temporal_patch_size=2,
                                    merge_size=2)


@pytest.fixture(scope="module")
def with_processor(tmp_path_factory):
    """A converted Qwen2-VL checkpoint carrying a tokenizer, chat template and image processor,
    and two pictures of different sizes."""
    from PIL import Image

    from qcache_jax import convert_hf, load

    d = tmp_path_factory.mktemp("qwen_proc")
    hf = _hf_model("qwen2_vl", seed=3, vocab=168)
    hf.save_pretrained(str(d / "hf"))
    _tokenizer().save_pretrained(str(d / "hf"))
    _image_processor().save_pretrained(str(d / "hf"))
    rng = np.random.default_rng(14)
    pics = []
    for i, (h, w) in enumerate(((30, 45), (44, 24))):
        pics.append(d / f"pic{i}.png")
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(pics[-1])
    return hf, load(convert_hf(d / "hf", d / "ckpt", progress=False)), pics


def test_encode_expands_image_pads_like_the_processor(with_processor):
    from PIL import Image

    _, qm, pics = with_processor
    ids, pv, grid = qm.encode("what shape", [pics[0], pics[1]])
    want = _image_processor()(images=[Image.open(p).convert("RGB") for p in pics], return_tensors="np")
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    np.testing.assert_array_equal(pv, want["pixel_values"])
    text = qm.chat_text([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                      {"type": "text", "text": "what shape"}]}])
    first, second = (int(np.prod(g)) // 4 for g in grid)
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * first, 1)
    head, tail = expanded.rsplit("<|image_pad|><|vision_end|>", 1)
    expanded = head + "<|image_pad|>" * second + "<|vision_end|>" + tail
    assert ids == _tokenizer()(expanded)["input_ids"]
    assert ids.count(IMAGE) == first + second and grid.shape == (2, 3)


def test_prompt_generate_equals_input_ids_generate(with_processor):
    _, qm, pics = with_processor
    ids, pv, grid = qm.encode("what shape", [pics[0]])
    a = qm.generate("what shape", [pics[0]], max_new_tokens=5, eos_token_id=-1, lazy="1-2", mode="vla")
    b = qm.generate(input_ids=np.asarray([ids]), pixel_values=pv, image_grid_thw=grid, max_new_tokens=5,
                    eos_token_id=-1, lazy="1-2", mode="vla")
    assert a.token_ids == b.token_ids and a.prompt_token_ids == [ids]
    batch = qm.generate(["what shape", "what shape"], [[pics[0]], [pics[1]]], max_new_tokens=5, eos_token_id=-1)
    alone = qm.generate("what shape", [pics[1]], max_new_tokens=5, eos_token_id=-1)
    assert batch.token_ids[1] == alone.token_ids[0]


def test_calibrate_and_eval_run(with_processor, tmp_path):
    import json

    from qcache_jax.tools.calibrate import calibrate
    from qcache_jax.tools.evaluate import evaluate

    _, qm, pics = with_processor
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "prompt": "what shape", "question": "what shape",
                                        "answer": "w3"}) + "\n" for p in pics))
    res = calibrate(qm, data, lazy_fraction=0.5, out=tmp_path / "schedule.json", progress=False)
    assert (tmp_path / "schedule.json").is_file() and len(res.schedule.lazy) == 4
    assert np.isfinite(res.divergence["vla"].pairwise).all() and res.divergence["vla"].pairwise.max() > 0
    # the KV saving is reported for the samples' real visual-token count (it depends on each image's size)
    counts = [qm.encode("what shape", [p])[0].count(IMAGE) for p in pics]
    assert res.kv_saving["image_tokens"] == round(np.mean(counts)) > 0 and res.kv_saving["fraction"] > 0
    ev = evaluate(qm, data, lazy=res.schedule, max_new_tokens=3, batch_size=2)
    assert ev.n == 2 and len(ev.predictions) == 2 and ev.lazy_layers == res.schedule.lazy_layers
    assert 0 < ev.kv_cache_bytes < ev.dense_kv_cache_bytes


def test_device_mesh_equals_one_device():
    """Qwen2.5-VL on meshes of 4 CPU devices (a subprocess): the decoder sharded as for LLaVA,
    the tower replicated; logits and greedy tokens equal one device's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(here / "qwen_mesh_check.py")], env=env, cwd=here.parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res) == {"data=2,model=2", "model=4", "data=4"}
    for mesh, r in res.items():
        assert r["same_tokens"], mesh
        assert r["logits_diff"] <= TOL, (mesh, r)


def test_bench_inputs_and_presets(pair):
    """``qcache bench``'s synthetic Qwen inputs (one image of a chosen token count per row) run
    through generate, and the Qwen2.5-VL-7B preset has the real model's size."""
    from qcache_jax.nn.families import abstract_model
    from qcache_jax.tools import bench

    _, _, ours = pair
    inputs = bench.bench_inputs(ours.config, batch=2, prompt_tokens=5, image_tokens=12)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 6, 8]]
    assert ((inputs["input_ids"] == IMAGE).sum(1) == 12).all()
    res = ours.generate(**inputs, max_new_tokens=3, eos_token_id=-1)
    assert [len(t) for t in res.token_ids] == [3, 3]
    n, _ = bench.count_params(abstract_model(bench.preset_config("qwen2.5-vl-7b"))[1])
    assert 8.25e9 < n < 8.35e9  # Qwen2.5-VL-7B-Instruct: 8.29B parameters
    assert bench.default_image_tokens(bench.preset_config("qwen-cpu")) == 256


def test_bench_refuses_a_model_larger_than_memory(monkeypatch):
    from qcache_jax.tools import bench

    monkeypatch.setattr(bench, "_meminfo", lambda field: 2**30)  # 1 GiB available
    with pytest.raises(QCacheError, match=r"weights alone take 30\.9 GiB"):
        bench.check_fits_memory(bench.preset_config("qwen2.5-vl-7b"), "random:qwen2.5-vl-7b")
    bench.check_fits_memory(bench.preset_config("tiny"), "random:tiny")  # 1 GiB holds it


def test_cli_generate_with_an_image(with_processor, capsys):
    import json

    from qcache_jax.cli import main

    _, qm, pics = with_processor
    rc = main(["generate", str(qm.path), "--prompt", "what shape", "--image", str(pics[1]), "--lazy", "1-2",
               "--mode", "vla", "--max-new-tokens", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["token_ids"]) == 3 and out["kv_cache_bytes"] < out["dense_kv_cache_bytes"]
    assert out["prompt_token_ids"].count(IMAGE) == int(np.prod(qm.encode("x", [pics[1]])[2])) // 4
    rc = main(["generate", str(qm.path), "--prompt", "what shape", "--raw", "--image", str(pics[1])])
    assert rc == 2 and "placeholder" in capsys.readouterr().err


@pytest.mark.parametrize("lazy,mode", [(None, "vla"), ("3-4", "gla")])
def test_fastv_matches_reference_and_decodes(lazy_pair, lazy, mode):
    """FastV after layer 1 keeping half of the visual tokens: logits equal the numpy reference
    (dropped image-pad tokens are no keys above K; their M-RoPE positions are unchanged), and
    decode over the pruned cache equals the full forward."""
    from lazy_reference import lazy_logits_reference

    hf, qm = lazy_pair
    per_row = [[(1, 4, 6)], [(1, 6, 8)]]
    ids, pv, grid = _batch(np.random.default_rng(15), per_row)
    flags = qm.resolve_lazy(lazy or "none", mode).lazy
    ref = lazy_logits_reference(hf, ids, pv, flags, mode, fastv=(1, 0.5), image_grid_thw=grid)
    out = qm.logits(ids, pv, lazy=lazy, mode=mode, image_grid_thw=grid, fastv_layer=1, fastv_keep=0.5)
    assert np.abs(out - ref).max() <= TOL
    res = qm.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, lazy=lazy, mode=mode, fastv_layer=1,
                      fastv_keep=0.5, max_new_tokens=4, return_logits=True, eos_token_id=-1)
    start = 0
    for row, gs in enumerate(per_row):
        n = sum(t * h * w for t, h, w in gs)
        full = np.concatenate([ids[row], res.token_ids[row][:-1]])[None]
        want = qm.logits(full, pv[start:start + n], lazy=lazy, mode=mode, image_grid_thw=np.asarray(gs), fastv_layer=1,
                         fastv_keep=0.5, fastv_row=ids.shape[1] - 1)[0, ids.shape[1] - 1:]
        np.testing.assert_allclose(res.logits[row], want, atol=TOL, rtol=0)
        start += n


def test_unequal_prompts_in_one_batch_equal_each_alone(lazy_pair):
    """Left-padded HF-style rows of different lengths and image sizes (the engine right-pads
    them): each row generates what it generates alone, with a lazy VLA schedule."""
    _, qm = lazy_pair
    rng = np.random.default_rng(16)
    r0, r1 = _row(rng, [(1, 4, 4)]), _row(rng, [(1, 8, 6)], n_text=11)
    t = max(len(r0), len(r1))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    for i, r in enumerate((r0, r1)):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    pv, grid = _pixels(rng, [(1, 4, 4), (1, 8, 6)])
    kw = dict(lazy="1-2,4", mode="vla", max_new_tokens=6, eos_token_id=-1)
    both = qm.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, **kw)
    a = qm.generate(input_ids=np.asarray([r0]), pixel_values=pv[:16], image_grid_thw=grid[:1], **kw)
    b = qm.generate(input_ids=np.asarray([r1]), pixel_values=pv[16:], image_grid_thw=grid[1:], **kw)
    assert both.token_ids == [a.token_ids[0], b.token_ids[0]]


def test_tied_embeddings(tmp_path):
    """Qwen2-VL-2B / Qwen2.5-VL-3B tie the head to the embeddings: converted without lm_head,
    logits as HF's."""
    from transformers import Qwen2VLForConditionalGeneration

    cfg = _hf_config("qwen2_vl")
    cfg.tie_word_embeddings = True
    torch.manual_seed(17)
    hf = Qwen2VLForConditionalGeneration(cfg).eval()
    qm = converted(hf, tmp_path)
    assert qm.config.text.tie_word_embeddings and "lm_head" not in qm.params
    rng = np.random.default_rng(17)
    ids = np.asarray([_row(rng, [(1, 6, 4)])])
    pv, grid = _pixels(rng, [(1, 6, 4)])
    assert np.abs(qm.logits(ids, pv, image_grid_thw=grid) - _hf_logits(hf, ids, pv=pv, grid=grid)).max() <= TOL


def test_serve_and_tune_refuse_the_family(pair, capsys):
    from qcache_jax.cli import main

    _, _, ours = pair
    for argv in (["serve", str(ours.path)], ["tune", str(ours.path), "--lazy", "1-2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Qwen2-VL" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_pruned_checkpoint_runs_its_gla_schedule(lazy_pair, tmp_path):
    """qcache prune on the family: the GLA lazy layers' q/k weights are gone, logits and
    greedy tokens are the unpruned model's under that schedule."""
    from qcache_jax import load
    from qcache_jax.tools.prune import prune

    _, qm = lazy_pair
    prune(qm.path, tmp_path / "pruned", lazy="1-2,4", mode="gla")
    pruned = load(tmp_path / "pruned")
    attn = pruned.params["language_model"]["layers"][1]["self_attn"]
    assert attn["q_proj"]["kernel"].size == 0 and attn["k_proj"]["kernel"].size == 0  # removed: zero-size
    ids, pv, grid = _batch(np.random.default_rng(18), [[(1, 6, 4)]])
    kw = dict(image_grid_thw=grid, lazy="1-2,4", mode="gla")
    np.testing.assert_allclose(pruned.logits(ids, pv, **kw), qm.logits(ids, pv, **kw), atol=1e-5, rtol=0)
    gen = dict(input_ids=ids, pixel_values=pv, max_new_tokens=4, eos_token_id=-1, **kw)
    assert pruned.generate(**gen).token_ids == qm.generate(**gen).token_ids
