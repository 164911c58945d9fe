"""Qwen2-VL's M-RoPE positions, computed on the host (numpy) before ``jit``.

Every token has three rotary positions (temporal, height, width). A text token has all three
equal to its running index; an image's visual tokens (one per merged 2x2 patch block, in the
merger's row-major order) take the image's start index plus (0, row, column), and the text
after an image resumes at start + max(rows, columns). These are transformers'
``Qwen2VLModel.get_rope_index`` rules; only the image-pad tokens count as visual (the vision
start/end markers are text).

These *RoPE positions* are not the *mask positions*: causal order and validity still come from
each token's index in its row (:class:`~qcache_jax.lazy.attention.SequencePass.positions`),
since several tokens share a RoPE position. Decode continues from ``next_positions``: the first
generated token turns by the prompt's largest RoPE position + 1, with all three axes equal.
"""

from __future__ import annotations

import numpy as np

from ..errors import QCacheError


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
    """(value, start, end) of each run of equal consecutive values of a 1-D bool array."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [flags.size]])
    return [(bool(flags[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def rope_index(input_ids, valid, image_grid_thw, *, image_token_id: int, spatial_merge_size: int):
    """(positions [3, B, T] int32, next_positions [B] int32) of a batch.

    ``input_ids`` and ``valid`` [B, T] (padding on either side); ``image_grid_thw`` [N, 3] the
    patch grids of the batch's images in order (row after row), or None for text only (then
    every axis is the token index, as transformers does without images). Each run of image-pad
    tokens takes the next grid and must hold exactly its merged token count. Padding entries
    get position 0 (they are never attended to).
    """
    ids = np.asarray(input_ids)
    valid = np.asarray(valid, bool)
    b, t = ids.shape
    if image_grid_thw is None:
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (3, b, t)).copy()
        last = np.where(valid.any(1), t - 1 - np.argmax(valid[:, ::-1], axis=1), -1)
        return pos, (last + 1).astype(np.int32)
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    m = int(spatial_merge_size)
    pos = np.zeros((3, b, t), np.int32)
    nxt = np.zeros((b,), np.int32)
    g = 0
    for row in range(b):
        cols = np.flatnonzero(valid[row])
        is_img = ids[row, cols] == image_token_id
        parts, cur = [], 0
        for visual, s, e in _runs(is_img):
            if not visual:
                parts.append(np.broadcast_to(np.arange(cur, cur + e - s), (3, e - s)))
                cur += e - s
                continue
            if g >= len(grids):
                raise QCacheError(f"row {row} has more images (runs of image tokens) than image_grid_thw has grids ({len(grids)})")
            gt, gh, gw = (int(x) for x in grids[g])
            lh, lw = gh // m, gw // m
            if gt != 1:
                raise QCacheError("video inputs are not supported (an image_grid_thw entry has t > 1)")
            if e - s != lh * lw:
                raise QCacheError(
                    f"row {row}: a run of {e - s} image tokens does not match image {g}'s grid "
                    f"{(gt, gh, gw)} ({lh * lw} tokens after the {m}x{m} merge)"
                )
            hh, ww = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
            parts.append(np.stack([np.zeros(lh * lw, np.int64), hh.reshape(-1), ww.reshape(-1)]) + cur)
            cur += max(lh, lw)
            g += 1
        if parts:
            p = np.concatenate(parts, axis=1)
            pos[:, row, cols] = p
            nxt[row] = p.max() + 1
    if g != len(grids):
        raise QCacheError(f"image_grid_thw has {len(grids)} grids but input_ids hold {g} images (runs of image tokens)")
    return pos, nxt
