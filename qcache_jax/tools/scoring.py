"""Scoring answers in one full-sequence pass: the logits at the answer positions of packed rows
and their loss / exact match. Shared by training (the loss) and evaluation (teacher-forced exact
match), so both score an answer the same way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..lazy.attention import LazyAttention
from ..runtime.forward import hidden_states


def answer_logits(graphdef, params, batch: dict, lazy, *, mode: str, impl: str, loop: str = "scan", fastv=None):
    """Float32 logits [R, slots, A, V] at the scored positions ``batch["ans_pos"]`` [R, slots,
    A], from one pass of the model (packed rows: ``positions`` / ``segments``).

    ``fastv`` (:class:`~qcache_jax.lazy.fastv.FastV`, one question per row): visual tokens
    ranked by the last prompt token, the position that predicts the first answer token, as
    generation ranks them at prefill."""
    model = nnx.merge(graphdef, params)
    ids = batch["input_ids"]
    positions, segments, fastv_row = batch.get("positions"), batch.get("segments"), None
    if fastv is not None:
        if batch["ans_pos"].shape[1] != 1:
            raise ValueError("FastV scoring needs one question per row (slots=1): its kept set is per question")
        fastv_row = batch["ans_pos"][:, 0, 0]
        # One slot: the row is the question's own sequence (positions 0..T-1, the suffix sees the
        # prefix and itself), so it runs unpacked, as a FastV pass must.
        positions = segments = None
    h = hidden_states(
        model, ids, batch["pixel_values"], batch.get("attention_mask"), lazy,
        attn=LazyAttention(mode=mode, impl=impl), loop=loop,
        positions=positions, segments=segments, fastv=fastv, fastv_row=fastv_row,
    )
    pos = batch["ans_pos"]
    hs = jnp.take_along_axis(h, pos.reshape(ids.shape[0], -1)[..., None], axis=1)
    return model.head(hs).reshape(*pos.shape, -1)


def answer_stats(logits, batch):
    """(mean NLL over the scored tokens, exact match per question [R, slots] bool): a question is
    answered exactly when every answer token and the EOS are the argmax."""
    tgt, mask = batch["ans_tgt"], batch["ans_mask"]
    lse = jax.nn.logsumexp(logits, axis=-1)
    tl = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    loss = ((lse - tl) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    hit = jnp.all((jnp.argmax(logits, -1) == tgt) | (mask == 0), axis=-1)
    return loss, hit
