"""The Qwen2-VL / Qwen2.5-VL vision tower as Flax NNX modules, numerically equal to transformers'
``Qwen2VisionTransformerPretrainedModel`` and ``Qwen2_5_VisionTransformerPretrainedModel``.

Layout
------
The tower sees every patch of every image (and video frame) packed into one sequence, batch 1.
All the data-dependent bookkeeping HF does in Python inside its forward (per-image position
ids, ``cu_seqlens``, Qwen2.5-VL's ``window_index`` and ``cu_window_seqlens``) is done once on the
host by :func:`pack_pixels` and handed to the jitted tower as arrays in :class:`QwenPixels`.
The only shape the tower is compiled for is the padded patch count ``N``: a new image size in
the same bucket changes array values only, never a static argument, so jit does not retrace.

* **Sequence order.** The blocks run over the patches in their *internal order*. For Qwen2-VL
  that is HF's order: image after image, each image in spatial-merge-block order (the
  ``merge x merge`` patches that become one visual token are consecutive, as the image
  processor emits them). For Qwen2.5-VL it is HF's *window order*: HF permutes whole merge
  groups by ``window_index`` so that each attention window is a consecutive run; we apply the
  same permutation to the patches on the host (the patch embedding is per patch, so permuting
  its input equals permuting its output). Padding patches follow the real ones.
* **Attention masks as segment ids.** HF attends each ``cu_seqlens`` chunk separately. Here one
  :func:`~qcache_jax.nn.attention.attend` call covers the whole sequence, bidirectional
  (``causal=False``), and each chunk gets its own segment id >= 1
  (a key is visible iff it is valid and in the query's segment). Full-attention blocks use one
  segment per frame (HF's ``cu_seqlens`` is per frame, ``t`` chunks for a ``t``-frame video);
  Qwen2.5-VL's window blocks use one segment per window. Padding patches are invalid keys and
  have segment 0, so they see nothing (their output is 0, never NaN) and nothing sees them.
* **Output order.** The merger runs in internal order; ``QwenPixels.unpermute`` gathers the
  merged tokens back into HF's ``pooler_output`` order (Qwen2.5-VL's ``argsort(window_index)``;
  the identity for Qwen2-VL), padding tokens last.

Parameter names follow HF's module tree under ``visual.`` (``blocks.3.attn.qkv.kernel`` is HF
``visual.blocks.3.attn.qkv.weight`` transposed; see :mod:`qcache_jax.io.names`). The patch
embedding is HF's Conv3d with stride = kernel, i.e. one matmul per flattened patch; it is stored
as ``patch_embed.proj.patch_kernel`` [C, T, P, P, E] (HF's [E, C, T, P, P] transposed by
(1, 2, 3, 4, 0)), which reshapes to the [C*T*P*P, E] matmul kernel without a copy.

Attention with segment ids runs only on the ``"xla"`` kernels (the Pallas kernels take no
segments). Their blocked path skips every key block outside the query block's segments, so a
block's work and memory follow the images' (or windows') sizes: a score tile at a time, never
[H, N, N] for the packed length N.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import QwenVisionConfig
from ..errors import QCacheError
from .attention import attend
from .layers import FcMlp, GatedMlp, LayerNorm, Linear, RMSNorm, activation, layer_list, layer_loop, matmul

VARIANTS = ("qwen2_vl", "qwen2_5_vl")
_INIT_STD = 0.02


# ----------------------------------------------------------------------------- config


def _check_config(cfg: QwenVisionConfig) -> None:
    if cfg.variant not in VARIANTS:
        raise QCacheError(f"unknown Qwen vision variant {cfg.variant!r}; expected one of {VARIANTS}")
    if cfg.embed_dim % cfg.num_heads or cfg.head_dim % 4:
        # The 2-D rotary splits each head into (h, w) halves of rotate-half pairs.
        raise QCacheError(f"head_dim {cfg.embed_dim}/{cfg.num_heads} must be an integer multiple of 4")
    if cfg.variant == "qwen2_5_vl" and cfg.window_size // cfg.spatial_merge_size // cfg.patch_size < 1:
        raise QCacheError(
            f"window_size {cfg.window_size} is smaller than one merged token "
            f"({cfg.spatial_merge_size} x {cfg.patch_size} pixels)"
        )


# ----------------------------------------------------------------------------- host-side inputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QwenPixels:
    """Everything the tower reads, as arrays (numpy from :func:`pack_pixels`; jax once passed
    to a jitted function). Every field's leading axis is the padded patch count ``N`` (or
    ``N / merge_unit`` for ``unpermute``), so two inputs with the same ``N`` have the same
    shapes and jit reuses its compilation.

    All per-patch fields are in the tower's *internal order* (module docstring): HF's patch
    order for Qwen2-VL, HF's window order for Qwen2.5-VL; padding patches last.

    Attributes:
      patches: [N, C*T*P*P] flattened patches (the image processor's ``pixel_values`` rows,
        permuted into internal order), zeros for padding.
      pos_hw: [N, 2] int32, the (row, column) of each patch in its image's patch grid: the two
        angles of the 2-D rotary (HF ``get_vision_position_ids``). 0 for padding.
      image_seg: [N] int32, the full-attention segment of each patch: one id >= 1 per frame
        (HF's ``cu_seqlens`` chunks), 0 for padding.
      window_seg: [N] int32, the window-attention segment (Qwen2.5-VL: one id >= 1 per window,
        HF's ``cu_window_seqlens`` chunks; Qwen2-VL has no windows and repeats ``image_seg``),
        0 for padding.
      valid: [N] bool, False for padding patches (invalid keys: no query sees them).
      unpermute: [N / merge_unit] int32, output token i is merged token ``unpermute[i]`` of the
        internal order: HF's ``argsort(window_index)`` for the real tokens, then the padding
        tokens in place.
    """

    patches: np.ndarray | jax.Array
    pos_hw: np.ndarray | jax.Array
    image_seg: np.ndarray | jax.Array
    window_seg: np.ndarray | jax.Array
    valid: np.ndarray | jax.Array
    unpermute: np.ndarray | jax.Array


def _check_grid(image_grid_thw, cfg: QwenVisionConfig) -> np.ndarray:
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] < 1:
        raise QCacheError(f"image_grid_thw must have shape [n_images, 3], got {list(grid.shape)}")
    if not np.issubdtype(grid.dtype, np.integer) and not np.all(grid == np.round(grid)):
        raise QCacheError("image_grid_thw must hold integers (t, h, w in patches)")
    grid = grid.astype(np.int64)
    if np.any(grid <= 0):
        raise QCacheError(f"image_grid_thw entries must be positive, got {grid.tolist()}")
    m = cfg.spatial_merge_size
    bad = [tuple(g) for g in grid.tolist() if g[1] % m or g[2] % m]
    if bad:
        raise QCacheError(f"image grid (t, h, w) {bad[0]} is not divisible by spatial_merge_size {m} in h and w")
    return grid


def check_pixels(pixel_values, image_grid_thw, cfg: QwenVisionConfig):
    """(grid [n, 3] int64, pixel_values array, patch count), checked against each other
    (QCacheError naming the problem); nothing is copied."""
    grid = _check_grid(image_grid_thw, cfg)
    px = np.asarray(pixel_values)
    total = int(sum(t * h * w for t, h, w in grid.tolist()))
    if px.ndim != 2 or px.shape != (total, cfg.patch_dim):
        raise QCacheError(
            f"pixel_values must have shape [{total}, {cfg.patch_dim}] for image_grid_thw "
            f"{grid.tolist()} (sum of t*h*w patches, C*T*P*P values each), got {list(px.shape)}"
        )
    return grid, px, total


def merged_tokens(image_grid_thw, cfg: QwenVisionConfig) -> list[int]:
    """Visual tokens per image (``t * h * w // merge_unit``): how many rows of the tower's
    output, and how many image placeholder tokens in the prompt, each image gets."""
    grid = _check_grid(image_grid_thw, cfg)
    return [int(t * h * w) // cfg.merge_unit for t, h, w in grid.tolist()]


def _block_positions(h: int, w: int, m: int) -> np.ndarray:
    """[h*w, 2] (row, column) of each patch in spatial-merge-block order (HF
    ``get_vision_position_ids``: the m x m patches of one merged token are consecutive)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    return np.stack([rows.reshape(shape).transpose(0, 2, 1, 3).ravel(),
                     cols.reshape(shape).transpose(0, 2, 1, 3).ravel()], axis=-1)


def _window_order(lh: int, lw: int, win: int) -> tuple[np.ndarray, np.ndarray]:
    """HF ``get_vision_window_index`` for one frame of ``lh x lw`` merged tokens: (order, window)
    with ``order`` the merged tokens' row-major indices in window order (windows of ``win x win``
    tokens, row-major over windows, row-major within one; partial windows at the bottom and
    right edges) and ``window`` each ordered token's window number, 0-based, empty windows
    skipped."""
    r, c = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
    key = ((r // win) * (-(-lw // win)) + c // win).ravel()
    order = np.argsort(key, kind="stable")  # stable: row-major within a window
    _, window = np.unique(key[order], return_inverse=True)
    return order, window.reshape(-1)


def pack_pixels(pixel_values, image_grid_thw, cfg: QwenVisionConfig, *, patches: int | None = None) -> QwenPixels:
    """The tower's input for ``pixel_values`` [sum(t*h*w), C*T*P*P] (as ``Qwen2VLImageProcessor``
    emits them, images concatenated) with ``image_grid_thw`` [n, 3] (t, h, w in patches).

    Numpy in, numpy out, outside jit. ``patches`` pads the patch count to that bucket size (a
    multiple of ``merge_unit``, at least the real count); None: no padding. Videos (t > 1) are
    packed like HF does: each frame its own full-attention segment, frames keep the image's
    (h, w) rotary positions.
    """
    _check_config(cfg)
    grid, px, total = check_pixels(pixel_values, image_grid_thw, cfg)
    mu = cfg.merge_unit
    n = total if patches is None else int(patches)
    if n < total or n % mu:
        raise QCacheError(f"patches={patches} must be a multiple of {mu} and at least the {total} real patches")

    m = cfg.spatial_merge_size
    windowed = cfg.variant == "qwen2_5_vl"
    win = cfg.window_size // m // cfg.patch_size if windowed else 0
    group_perm, pos, frame_seg, window_seg = [], [], [], []
    group0 = frame = window = 0  # running merged-token offset, frame and window counts
    for t, h, w in grid.tolist():
        hw = _block_positions(h, w, m)
        lh, lw = h // m, w // m
        for _ in range(t):
            if windowed:
                order, win_of = _window_order(lh, lw, win)
            else:
                order, win_of = np.arange(lh * lw), np.zeros(lh * lw, np.int64)
            group_perm.append(group0 + order)
            pos.append(hw.reshape(lh * lw, mu, 2)[order].reshape(-1, 2))
            frame_seg.append(np.full(lh * lw * mu, frame + 1))
            window_seg.append(np.repeat(window + 1 + win_of, mu))
            group0, frame, window = group0 + lh * lw, frame + 1, window + int(win_of.max()) + 1
    group_perm = np.concatenate(group_perm)  # HF window_index (identity for Qwen2-VL)
    patch_perm = (group_perm[:, None] * mu + np.arange(mu)).ravel()
    pad = n - total

    def padded(x, value=0):
        return np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)])

    frame_seg = np.concatenate(frame_seg).astype(np.int32)
    return QwenPixels(
        patches=padded(px[patch_perm]),
        pos_hw=padded(np.concatenate(pos).astype(np.int32)),
        image_seg=padded(frame_seg),
        window_seg=padded(np.concatenate(window_seg).astype(np.int32) if windowed else frame_seg),
        valid=padded(np.ones(total, bool), False),
        unpermute=np.concatenate([np.argsort(group_perm), np.arange(total // mu, n // mu)]).astype(np.int32),
    )


# ----------------------------------------------------------------------------- modules


class PatchProj(nnx.Module):
    """HF ``patch_embed.proj``: a Conv3d whose stride equals its kernel, i.e. one matmul per
    flattened patch. Kept in HF's [C, T, P, P] patch layout (leading) so that the flattened
    patch rows of the image processor multiply it after a free reshape."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size, cfg.embed_dim)
        self.patch_kernel = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), shape)).astype(dtype))

    def __call__(self, patches):
        k = self.patch_kernel[...]
        return matmul(patches.astype(k.dtype), k.reshape(-1, k.shape[-1]))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.proj = PatchProj(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, patches):
        return self.proj(patches)


def rotary_angles(pos_hw, cfg: QwenVisionConfig):
    """cos, sin [N, head_dim] float32 of HF's 2-D vision rotary for patch positions [N, 2].

    ``head_dim // 4`` frequencies (HF computes them for a rotary of dim ``head_dim // 2``); the
    row angle turns the first half of the rotate-half pairs, the column angle the second.
    """
    spatial = cfg.head_dim // 2
    inv = 1.0 / (jnp.float32(cfg.rope_theta) ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv  # [N, 2, head_dim // 4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [h freqs | w freqs]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x, cos, sin):
    """HF ``apply_rotary_pos_emb_vision`` on [N, H, D]: in float32, cast back."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.qkv = Linear(d, 3 * d, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_heads

    def __call__(self, x, cos, sin, seg, valid, impl):
        n, d = x.shape
        h = self.num_heads
        # HF: qkv(x).reshape(N, 3, H, D): the output columns are [q | k | v], each head-major.
        qkv = self.qkv(x).reshape(n, 3, h, d // h)
        q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]

        def heads(y):  # [N, H, D] -> [1, H, N, D]
            return y.transpose(1, 0, 2)[None]

        # Bidirectional within a segment (an image or a window), masking by segment id and validity.
        o = attend(heads(q), heads(k), heads(v), None, None, valid[None], segments=seg[None], causal=False, impl=impl)
        return self.proj(o[0].transpose(1, 0, 2).reshape(n, d))


def _norm(cfg: QwenVisionConfig, dtype):
    """Qwen2-VL normalises with LayerNorm, Qwen2.5-VL with RMSNorm (both eps 1e-6 in HF)."""
    if cfg.variant == "qwen2_vl":
        return LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, dtype=dtype)
    return RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, dtype=dtype)


class VisionBlock(nnx.Module):
    """One pre-norm transformer block. Full vs window attention is not a property of the block
    (all blocks share one structure, so they scan): the caller passes the segment ids."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, dtype)
        self.norm2 = _norm(cfg, dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        d, f, act = cfg.embed_dim, cfg.intermediate_size, cfg.hidden_act
        # Qwen2-VL: fc1 -> act -> fc2; Qwen2.5-VL: gated, with biases.
        self.mlp = (FcMlp(d, f, act, dtype=dtype, rngs=rngs) if cfg.variant == "qwen2_vl"
                    else GatedMlp(d, f, act, bias=True, dtype=dtype, rngs=rngs))

    def __call__(self, x, cos, sin, seg, valid, impl):
        x = x + self.attn(self.norm1(x), cos, sin, seg, valid, impl)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then each ``merge_unit`` consecutive patches concatenated into one token, then HF's
    ``nn.Sequential(Linear, GELU, Linear)`` (exact GELU). ``mlp`` is an ``nnx.Dict`` keyed "0"
    and "2" so the parameter paths are HF's Sequential indices."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.embed_dim * cfg.merge_unit
        self.ln_q = _norm(cfg, dtype)
        self.mlp = nnx.Dict({
            "0": Linear(d, d, bias=True, dtype=dtype, rngs=rngs),
            "2": Linear(d, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs),
        })
        self.act = activation("gelu")
        self.merge_unit = cfg.merge_unit

    def __call__(self, x):
        x = self.ln_q(x)
        x = x.reshape(x.shape[0] // self.merge_unit, -1)
        return self.mlp["2"](self.act(self.mlp["0"](x)))


class QwenVisionTower(nnx.Module):
    """HF ``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel``
    (``cfg.variant``); its ``__call__`` returns what HF returns as ``pooler_output``."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        _check_config(cfg)
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = layer_list(cfg.depth, lambda r: VisionBlock(cfg, dtype=dtype, rngs=r), rngs)
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, pixels: QwenPixels, *, loop: str = "scan", impl: str = "xla") -> jax.Array:
        """Merged visual features [N / merge_unit, out_hidden_size]: the real tokens in HF's
        ``pooler_output`` order (image after image), padding tokens after them (finite values
        no one should read).

        ``impl``: the attention kernel; the default ``"xla"`` is the one that takes segment ids
        on every backend (the Pallas kernels do not).
        """
        cfg = self.cfg
        dtype = self.patch_embed.proj.patch_kernel[...].dtype
        x = self.patch_embed(jnp.asarray(pixels.patches))
        cos, sin = rotary_angles(jnp.asarray(pixels.pos_hw), cfg)
        valid = jnp.asarray(pixels.valid)
        full, windowed = jnp.asarray(pixels.image_seg), jnp.asarray(pixels.window_seg)
        full_blocks = set(cfg.fullatt_block_indexes) if cfg.variant == "qwen2_5_vl" else set(range(cfg.depth))
        segs = [full if i in full_blocks else windowed for i in range(cfg.depth)]

        def body(block, h, seg):
            return block(h, cos, sin, seg, valid, impl), None

        x, _ = layer_loop(list(self.blocks), body, x.astype(dtype), segs, loop=loop)
        merged = self.merger(x)
        return jnp.take(merged, jnp.asarray(pixels.unpermute), axis=0)
