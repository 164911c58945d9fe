"""The Qwen2-VL / Qwen2.5-VL vision tower against transformers' own towers (tiny random models
built here, float32, no downloads): merged features equal to HF's ``pooler_output`` within
TOL for single images of several sizes, several images in one call, a video, padding to a
bucket; one compilation per bucket; bad inputs raise QCacheError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from qcache_jax.config import QwenVisionConfig  # noqa: E402
from qcache_jax.errors import QCacheError  # noqa: E402
from qcache_jax.io.hf_config import vision_config_from_hf  # noqa: E402
from qcache_jax.nn.qwen_vision import QwenPixels, QwenVisionTower, merged_tokens, pack_pixels  # noqa: E402

TOL = 1e-4  # max abs difference of the merged features, float32 (HF outputs: std ~4, max ~17)
VARIANTS = ("qwen2_vl", "qwen2_5_vl")
PATCH, MERGE = 4, 2


def _build_hf(variant: str):
    """A tiny random HF tower with every parameter (norm weights and biases too) randomised."""
    torch.manual_seed(0)
    if variant == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        vc = Qwen2VLVisionConfig(depth=3, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2,
                                 patch_size=PATCH, spatial_merge_size=MERGE, attn_implementation="eager")
        model = Qwen2VisionTransformerPretrainedModel(vc)
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        # window_size = 2 merged tokens: several windows per image, partial ones at the edges.
        vc = Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, out_hidden_size=48, intermediate_size=40,
                                    num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                                    window_size=2 * MERGE * PATCH, fullatt_block_indexes=[1],
                                    attn_implementation="eager")
        model = Qwen2_5_VisionTransformerPretrainedModel(vc)
    model = model.eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return vc, model


def _hf_to_flax(path: tuple[str, ...], hf_sd: dict) -> np.ndarray:
    """The HF tensor of our parameter at ``path``, in our layout (the repo's naming rules plus
    patch_kernel = Conv3d weight transposed (1, 2, 3, 4, 0))."""
    *mods, leaf = path
    base = ".".join(mods)
    if leaf == "patch_kernel":
        return hf_sd[f"{base}.weight"].transpose(1, 2, 3, 4, 0)
    if leaf == "kernel":
        return hf_sd[f"{base}.weight"].T
    if leaf == "scale":
        return hf_sd[f"{base}.weight"]
    return hf_sd[f"{base}.{leaf}"]


def _flat_paths(tree):
    return [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
            for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class _Pair:
    """An HF tower and ours with the same weights."""

    def __init__(self, variant: str):
        self.vc, self.hf = _build_hf(variant)
        self.cfg = vision_config_from_hf(self.vc, variant)
        self.model = QwenVisionTower(self.cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
        hf_sd = {k: v.numpy() for k, v in self.hf.state_dict().items()}
        state = nnx.state(self.model, nnx.Param)
        pure = nnx.to_pure_dict(state)
        paths = _flat_paths(pure)
        used = set()

        def fill(kp, x):
            path = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
            y = _hf_to_flax(path, hf_sd)
            assert y.shape == x.shape, (path, y.shape, x.shape)
            return jnp.asarray(y)

        pure = jax.tree_util.tree_map_with_path(fill, pure)
        for p in paths:  # which HF names our paths covered
            *mods, leaf = p
            hf_leaf = {"patch_kernel": "weight", "kernel": "weight", "scale": "weight"}.get(leaf, leaf)
            used.add(".".join([*mods, hf_leaf]))
        self.unmapped = set(hf_sd) - used
        self.extra = used - set(hf_sd)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(self.model, state)
        self.paths = paths
        graphdef, params = nnx.split(self.model)
        self.graphdef, self.params = graphdef, params
        self.forwards: dict = {}

    def hf_out(self, px: np.ndarray, grid) -> np.ndarray:
        with torch.no_grad():
            out = self.hf(torch.from_numpy(px), grid_thw=torch.tensor(grid, dtype=torch.long))
        return out.pooler_output.numpy()


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request):
    return _Pair(request.param)


def _forward(pair: _Pair, loop: str = "scan"):
    """``[jitted forward(params, pixels), times traced]`` for ``loop``, one per pair."""
    if loop not in pair.forwards:
        graphdef, entry = pair.graphdef, [None, 0]

        @jax.jit
        def fwd(params, pixels: QwenPixels):
            entry[1] += 1
            return nnx.merge(graphdef, params)(pixels, loop=loop)

        entry[0] = fwd
        pair.forwards[loop] = entry
    return pair.forwards[loop]


def _pixels(grids, cfg: QwenVisionConfig, seed: int = 0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, cfg.patch_dim)).astype(np.float32)


def _ours(pair: _Pair, px, grids, patches=None, loop="scan"):
    fwd = _forward(pair, loop)[0]
    out = np.asarray(fwd(pair.params, pack_pixels(px, np.array(grids), pair.cfg, patches=patches)))
    return out


def test_param_names_map_onto_hf(pair):
    assert not pair.unmapped, f"HF tensors with no parameter here: {sorted(pair.unmapped)}"
    assert not pair.extra, f"parameters with no HF tensor: {sorted(pair.extra)}"
    blk = [".".join(p) for p in pair.paths if p[:2] in (("blocks", "0"),) or p[0] != "blocks"]
    print(f"\n{pair.cfg.variant} param paths (block 0 and non-block):\n  " + "\n  ".join(blk))
    assert ("merger", "mlp", "0", "kernel") in pair.paths and ("merger", "mlp", "2", "bias") in pair.paths
    assert ("patch_embed", "proj", "patch_kernel") in pair.paths


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 6, 8), (1, 8, 6), (1, 10, 14)])
def test_single_image_matches_hf(pair, grid):
    px = _pixels([grid], pair.cfg, seed=sum(grid))
    ref = pair.hf_out(px, [grid])
    out = _ours(pair, px, [grid])
    assert out.shape == ref.shape == (merged_tokens([grid], pair.cfg)[0], pair.cfg.out_hidden_size)
    diff = float(np.max(np.abs(out - ref)))
    print(f"\n{pair.cfg.variant} {grid}: max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_two_images_and_video_match_hf(pair):
    grids = [(1, 6, 8), (1, 10, 4), (2, 4, 6)]  # two images and a two-frame video
    px = _pixels(grids, pair.cfg, seed=7)
    ref = pair.hf_out(px, grids)
    out = _ours(pair, px, grids)
    assert out.shape == ref.shape == (sum(merged_tokens(grids, pair.cfg)), pair.cfg.out_hidden_size)
    diff = float(np.max(np.abs(out - ref)))
    print(f"\n{pair.cfg.variant} {grids}: max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_padding_and_unrolled_loop(pair):
    grids = [(1, 6, 8), (1, 4, 4)]  # 64 real patches, padded to 96
    px = _pixels(grids, pair.cfg, seed=3)
    ref = pair.hf_out(px, grids)
    n = ref.shape[0]
    out = _ours(pair, px, grids, patches=96)
    assert out.shape == (96 // pair.cfg.merge_unit, pair.cfg.out_hidden_size)
    assert np.all(np.isfinite(out))
    diff = float(np.max(np.abs(out[:n] - ref)))
    unrolled = _ours(pair, px, grids, patches=96, loop="unroll")[:n]
    print(f"\n{pair.cfg.variant} padded 64 -> 96: max |diff| = {diff:.2e}; "
          f"unroll vs HF {np.max(np.abs(unrolled - ref)):.2e}")
    assert diff <= TOL
    assert np.max(np.abs(unrolled - ref)) <= TOL


def test_bucket_compiles_once(pair):
    fwd = _forward(pair)
    before = fwd[1]
    outs = []
    for grids in ([(1, 4, 6)], [(1, 6, 4)], [(1, 2, 10)], [(1, 2, 2), (1, 4, 4)]):  # 24 / 24 / 20 / 20 patches
        px = _pixels(grids, pair.cfg, seed=len(grids))
        ref = pair.hf_out(px, grids)
        out = _ours(pair, px, grids, patches=32)
        outs.append(float(np.max(np.abs(out[: ref.shape[0]] - ref))))
    assert fwd[1] - before == 1, f"traced {fwd[1] - before} times for one bucket"
    assert max(outs) <= TOL, outs


def test_bfloat16_runs_close(pair):
    grids = [(1, 6, 8)]
    px = _pixels(grids, pair.cfg, seed=5)
    ref = pair.hf_out(px, grids)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), pair.params)
    out = jax.jit(lambda prm, pk: nnx.merge(pair.graphdef, prm)(pk))(params, pack_pixels(px, np.array(grids), pair.cfg))
    assert out.dtype == jnp.bfloat16
    rel = float(np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref)))
    print(f"\n{pair.cfg.variant} bfloat16: max |diff| / max |ref| = {rel:.2e}")
    assert rel < 0.05


def test_merged_tokens_and_pack_layout(pair):
    cfg = pair.cfg
    assert merged_tokens([(1, 6, 8), (2, 4, 4)], cfg) == [12, 8]
    p = pack_pixels(_pixels([(1, 6, 8)], cfg), np.array([(1, 6, 8)]), cfg, patches=64)
    assert p.patches.shape == (64, cfg.patch_dim) and p.unpermute.shape == (16,)
    assert p.pos_hw.dtype == np.int32 and p.image_seg.dtype == np.int32 and p.window_seg.dtype == np.int32
    assert not p.valid[48:].any() and p.valid[:48].all()
    assert (p.image_seg[48:] == 0).all() and (p.window_seg[48:] == 0).all() and (p.image_seg[:48] >= 1).all()
    assert sorted(p.unpermute.tolist()) == list(range(16)) and p.unpermute[12:].tolist() == [12, 13, 14, 15]
    # 6 x 8 patches = 3 x 4 merged tokens; windows of 2 x 2 tokens: 2 x 2 windows (partial bottom row).
    n_windows = len(set(p.window_seg[:48].tolist()))
    assert n_windows == (4 if cfg.variant == "qwen2_5_vl" else 1)


def test_bad_inputs_raise(pair):
    cfg = pair.cfg
    px = _pixels([(1, 4, 4)], cfg)
    cases = [
        lambda: pack_pixels(px[:-1], np.array([(1, 4, 4)]), cfg),  # wrong patch count
        lambda: pack_pixels(px[:, :-1], np.array([(1, 4, 4)]), cfg),  # wrong patch_dim
        lambda: pack_pixels(px, np.array([4, 4]), cfg),  # grid not [n, 3]
        lambda: pack_pixels(_pixels([(1, 3, 4)], cfg), np.array([(1, 3, 4)]), cfg),  # h not divisible by merge
        lambda: pack_pixels(px, np.array([(1, 4, 4)]), cfg, patches=12),  # bucket smaller than the image
        lambda: pack_pixels(px, np.array([(1, 4, 4)]), cfg, patches=18),  # not a multiple of merge_unit
        lambda: pack_pixels(px, np.array([(0, 4, 4)]), cfg),  # non-positive grid
        lambda: merged_tokens(np.array([(1, 4, 5)]), cfg),
        lambda: vision_config_from_hf(pair.vc, "qwen3_vl"),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(QCacheError):
            case()
            pytest.fail(f"case {i} did not raise")
