"""Helpers shared by the GPU and TPU kernels (wrapper side and kernel side)."""

from __future__ import annotations

import jax.numpy as jnp

# A key whose position is INT32_MAX is invisible to every query (positions are
# < 2**31 - 1), and a query at INT32_MIN sees no key: padding and kv_valid are
# folded into the positions, so the kernels read one int32 stream per side.
POS_NEVER_VISIBLE = jnp.iinfo(jnp.int32).max
POS_SEES_NOTHING = jnp.iinfo(jnp.int32).min

# lax.dot_general dimension numbers of the 2-D tiles inside the kernels.
DOT_NT = (((1,), (1,)), ((), ()))  # a @ b.T  (q @ k^T)
DOT_NN = (((1,), (0,)), ((), ()))  # a @ b    (p @ v)


def softmax_finish(m, l):
    """End of an online softmax: (1 / l, lse) from the running max and sum.

    Shape-agnostic (scalars, [rows] or [rows, 1]). Rows that saw no visible
    key have l == 0: they get 1 / l := 1 (the accumulator is 0, so out = 0)
    and lse = -inf, never NaN.
    """
    has_keys = l > 0
    l_safe = jnp.where(has_keys, l, 1.0)
    return 1.0 / l_safe, jnp.where(has_keys, m + jnp.log(l_safe), -jnp.inf)


def masked_kv_pos(kv_pos, kv_valid):
    """kv positions with invalid keys moved to POS_NEVER_VISIBLE."""
    return jnp.where(kv_valid, kv_pos, POS_NEVER_VISIBLE).astype(jnp.int32)


def pad_axis(x, axis, multiple, value):
    """Pads `axis` of x up to a multiple of `multiple` with `value`."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def largest_dividing_block(n, candidates):
    """The first of `candidates` (descending) that divides n, or None."""
    for c in candidates:
        if n % c == 0:
            return c
    return None


def pow2_chunks(d):
    """Power-of-two (offset, width) chunks of head_dim: 80 -> (0, 64), (64, 16).

    Triton tiles must have power-of-two shapes; reading D=80 as a 64- and a
    16-wide tile avoids padding (copying) the KV cache to 128.
    """
    chunks, offset = [], 0
    for bit in reversed(range(d.bit_length())):
        width = 1 << bit
        if d & width:
            chunks.append((offset, width))
            offset += width
    return tuple(chunks)


def probs_from_scores(scores, lse, lengths):
    """Normalized probabilities from scaled scores and the row lse.

    scores f32 [B, Hq, S] may hold garbage where a kernel did not visit
    (keys >= lengths); those entries are replaced by 0.
    """
    valid = jnp.arange(scores.shape[-1])[None, None, :] < lengths[:, None, None]
    return jnp.where(valid, jnp.exp(scores - lse[..., None]), 0.0)
