"""LLaVA-NeXT "anyres" image features: Hugging Face's ``LlavaNextModel.pack_image_features``
as one gather with static shapes.

Hugging Face's ``LlavaNextImageProcessor`` turns an image of (height, width) ``image_size``
into *views*: the base view (the whole image at the CLIP resolution), then the tiles of the
best-fitting ``image_grid_pinpoints`` grid (``nph x npw`` tiles, row-major). CLIP and the
projector give every view ``s x s`` feature rows (``s = image_size // patch_size``). HF then
lays the tiles' features out as one ``(nph s) x (npw s)`` grid, crops the rows (or columns)
that the processor's letterbox padding added (*unpad*, back to the image's aspect ratio),
appends the learned ``image_newline`` after every grid row, puts the base view's rows first,
and scatters the result into the image-token positions (``masked_scatter``: the k-th image
token of the batch, row-major, takes the k-th packed row).

All of that depends on the image sizes only. So the host computes, per batch, an index
(:func:`feature_index`): for the k-th image token of the batch, which row of the table
``[image_newline, view 0 rows, view 1 rows, ...]`` fills it. Inside ``jit`` the packing is one
gather (:func:`gather_features`); a new image size changes the index's values, never a shape,
so it never recompiles. The visual positions Lazy Attention's VLA inherits are exactly these
image-token positions: base view, tiles and newlines alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import LlavaConfig
from ..errors import QCacheError

NEWLINE_ROW = 0  # the table's row 0 is image_newline; view features start at row 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AnyresPixels:
    """LLaVA-NeXT image input in the form the model takes inside ``jit``.

    ``views`` [V, C, H, W]: every image's base view then its tiles, image after image (padding
    views at the end are computed and never read). ``index`` [K] int32: for the k-th image
    token of the batch, its row in ``[image_newline, features of view 0, of view 1, ...]``
    (entries past the batch's image tokens are ignored). Built on the host by :func:`pack`.
    """

    views: Any
    index: Any


# -- host side: sizes, counts and the gather index (numpy, before jit) ----------------------------


def select_best_resolution(size, pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) an image of ``size`` (height, width) is resized into:
    transformers' ``select_best_resolution`` (most effective pixels, then least waste)."""
    oh, ow = (int(x) for x in size)
    best, max_eff, min_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (int(h), int(w)), eff, waste
    return best


def _check(cfg: LlavaConfig) -> None:
    if not cfg.anyres:
        raise QCacheError("this is not a LLaVA-NeXT checkpoint: it takes pixel_values [N, C, H, W] and no image_sizes")
    if cfg.vision_feature_select_strategy != "default":
        raise QCacheError(
            "this LLaVA-NeXT checkpoint uses vision_feature_select_strategy='full': its tiles' features "
            "include CLIP's class token and do not form the tile grid, and transformers' LlavaNextModel "
            "cannot pack them either; only text inputs are supported"
        )


def grid_shape(size, cfg: LlavaConfig) -> tuple[int, int]:
    """(tile rows, tile columns) of an image of ``size`` (height, width)."""
    h, w = select_best_resolution(size, cfg.image_grid_pinpoints)
    t = cfg.vision.image_size
    return h // t, w // t


def num_views(size, cfg: LlavaConfig) -> int:
    """Views of an image of ``size``: the base view plus its tiles."""
    nph, npw = grid_shape(size, cfg)
    return 1 + nph * npw


def max_views(cfg: LlavaConfig) -> int:
    """The most views any image can have under the config's pinpoints."""
    t = cfg.vision.image_size
    return 1 + max((h // t) * (w // t) for h, w in cfg.image_grid_pinpoints)


def _unpadded(size, nph: int, npw: int, side: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the tile grid (in feature rows) that HF's ``unpad_image``
    keeps for an image of ``size`` (height, width)."""
    oh, ow = (int(x) for x in size)
    ch, cw = nph * side, npw * side
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def image_token_count(size, cfg: LlavaConfig) -> int:
    """Image tokens of one image of ``size`` (height, width): base view, the unpadded tile
    grid, and one newline per grid row (what ``LlavaNextProcessor`` expands ``<image>`` to)."""
    _check(cfg)
    side = cfg.vision.image_size // cfg.vision.patch_size
    r0, r1, c0, c1 = _unpadded(size, *grid_shape(size, cfg), side)
    return side * side + (r1 - r0) * (c1 - c0 + 1)


def _image_index(size, first_view: int, cfg: LlavaConfig) -> np.ndarray:
    side = cfg.vision.image_size // cfg.vision.patch_size
    per_view = side * side
    nph, npw = grid_shape(size, cfg)
    r0, r1, c0, c1 = _unpadded(size, nph, npw, side)
    # Table row of feature row j of view t: 1 + t * per_view + j (row 0 is image_newline).
    base = 1 + first_view * per_view + np.arange(per_view)
    y = np.arange(r0, r1)[:, None]
    x = np.arange(c0, c1)[None, :]
    # HF: tiles [nph, npw, s, s, D] -> permute(4, 0, 2, 1, 3): grid row a*s+y, column b*s+x is
    # tile (a, b)'s feature row y*s+x; then the unpadded crop, one newline per grid row.
    tile = first_view + 1 + (y // side) * npw + x // side
    grid = 1 + tile * per_view + (y % side) * side + x % side
    newline = np.full((r1 - r0, 1), NEWLINE_ROW)
    return np.concatenate([base, np.concatenate([grid, newline], axis=1).reshape(-1)])


def _sizes(image_sizes) -> np.ndarray:
    sizes = np.asarray(image_sizes)
    if sizes.ndim == 1 and sizes.size == 2:
        sizes = sizes[None]
    if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.number) or (sizes < 1).any():
        raise QCacheError(f"image_sizes must be [N, 2] (height, width) positive integers, got {sizes.shape}")
    return sizes.astype(np.int64)


def image_token_counts(image_sizes, cfg: LlavaConfig) -> list[int]:
    """:func:`image_token_count` of every image in ``image_sizes`` [N, 2]."""
    return [image_token_count(s, cfg) for s in _sizes(image_sizes)]


def feature_index(image_sizes, cfg: LlavaConfig) -> np.ndarray:
    """The gather index [K] int32 of a batch whose images (in order) have ``image_sizes``."""
    _check(cfg)
    parts, first = [], 0
    for s in _sizes(image_sizes):
        parts.append(_image_index(s, first, cfg))
        first += num_views(s, cfg)
    return (np.concatenate(parts) if parts else np.zeros((0,), np.int64)).astype(np.int32)


def pack(pixel_values, image_sizes, cfg: LlavaConfig) -> AnyresPixels:
    """HF-style LLaVA-NeXT inputs -> :class:`AnyresPixels` (numpy, unpadded).

    ``pixel_values``: [N, P, C, H, W] as ``LlavaNextProcessor`` returns them (image i uses its
    first ``num_views`` views; the rest is the processor's batch padding), or [V, C, H, W]
    with every image's views concatenated; ``image_sizes`` [N, 2] (height, width).
    """
    _check(cfg)
    sizes = _sizes(image_sizes)
    pv = np.asarray(pixel_values, dtype=np.float32)
    v = cfg.vision
    chw = (v.num_channels, v.image_size, v.image_size)
    views = [num_views(s, cfg) for s in sizes]
    if pv.ndim == 5 and tuple(pv.shape[2:]) == chw:
        if pv.shape[0] != len(sizes):
            raise QCacheError(f"pixel_values has {pv.shape[0]} image(s) but image_sizes has {len(sizes)}")
        if max(views, default=0) > pv.shape[1]:
            big = tuple(int(x) for x in sizes[int(np.argmax(views))])
            raise QCacheError(
                f"pixel_values has {pv.shape[1]} views per image, but an image of size {big} needs "
                f"{max(views)} (base view + tiles) under this model's image_grid_pinpoints"
            )
        flat = np.concatenate([pv[i, :n] for i, n in enumerate(views)]) if views else pv.reshape(0, *chw)
    elif pv.ndim == 4 and tuple(pv.shape[1:]) == chw:
        if pv.shape[0] != sum(views):
            raise QCacheError(
                f"pixel_values has {pv.shape[0]} views, the image_sizes need {sum(views)} (base views + tiles)"
            )
        flat = pv
    else:
        raise QCacheError(
            f"LLaVA-NeXT pixel_values must be [N, views, {chw[0]}, {chw[1]}, {chw[2]}] (as LlavaNextProcessor "
            f"returns them) or [views, {chw[0]}, {chw[1]}, {chw[2]}], got {tuple(pv.shape)}"
        )
    return AnyresPixels(views=np.ascontiguousarray(flat), index=feature_index(sizes, cfg))


def pad(images: AnyresPixels, n_views: int, n_index: int) -> AnyresPixels:
    """``images`` padded to ``n_views`` views and ``n_index`` index entries (a plan's buckets)."""
    views = np.zeros((n_views, *images.views.shape[1:]), np.float32)
    views[: len(images.views)] = images.views
    index = np.zeros((n_index,), np.int32)
    index[: len(images.index)] = images.index
    return AnyresPixels(views=views, index=index)


# -- inside jit --------------------------------------------------------------------------------------


def gather_features(view_features, image_newline, index):
    """Packed image features [K, D]: row k is what the k-th image token receives.

    ``view_features`` [V, s*s, D] (projected, per view), ``image_newline`` [D], ``index`` [K]
    from :func:`feature_index`.
    """
    d = view_features.shape[-1]
    table = jnp.concatenate([image_newline[None].astype(view_features.dtype), view_features.reshape(-1, d)])
    return table[index]
