"""The model's passes as pure functions of an NNX model (``nnx.merge(graphdef, params)``):
full-sequence logits, prefill, one decode step and the calibration probe. Each embeds, runs
the one layer stack (:func:`qcache_jax.lazy.stack.run_layers`) and applies the head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..lazy.attention import DecodePass, LazyAttention, SequencePass, fill_rows
from ..lazy.cache import CacheLayout, DecodingState
from ..lazy.schedule import Schedule
from ..lazy.stack import run_layers


def _sequence_pass(model, input_ids, valid, *, positions=None, rope_positions=None, segments=None, probe_rows=None,
                   img_idx=None, txt_idx=None, text_len=0, fastv_row=None):
    """The pass context. ``positions`` ([T] or [B, T]; default ``arange(T)``) are the *mask*
    positions: causal order. ``rope_positions`` (default: the mask positions) are what the
    rotary embedding turns by, in the family's scheme: [B, T], or [3, B, T] for M-RoPE, where
    several tokens of an image share a position and so cannot order the mask."""
    b, t = input_ids.shape
    if positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
    positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)
    if segments is not None:
        segments = jnp.broadcast_to(segments, (b, t)).astype(jnp.int32)
    cos, sin = model.rope(positions if rope_positions is None else jnp.asarray(rope_positions, jnp.int32))
    return SequencePass(
        cos=cos,
        sin=sin,
        positions=positions,
        valid=valid,
        vis=model.is_image(input_ids) & valid,
        segments=segments,
        probe_rows=probe_rows,
        fastv_row=fastv_row,
        img_idx=img_idx,
        txt_idx=txt_idx,
        text_len=text_len,
    )


def last_valid(valid):
    """Each row's last valid position [B] of a key mask [B, T] (padding on either side)."""
    t = valid.shape[1]
    return (t - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)


def hidden_states(model, input_ids, pixel_values=None, attention_mask=None, lazy=None, *, attn, loop="scan",
                  positions=None, rope_positions=None, segments=None, fastv=None, fastv_row=None, out="h"):
    """Final hidden states [B, T, hidden] (before the final norm) of a full-sequence pass.

    ``lazy``: a :class:`Schedule`, a traced bool array [L] (a scanned mask; training passes
    it as an argument so a new schedule does not recompile), or None (dense). Positions are
    ``arange(T)`` unless given ([T] or [B, T]); ``rope_positions``: the family's RoPE positions
    when they differ from those (Qwen2-VL's M-RoPE, [3, B, T]); ``attention_mask`` masks keys, as HF's forward
    without a cache; ``segments`` ([T] or [B, T]) packs several sequences after a shared prefix
    (segment 0) into one row, each position its own sequence's (see :class:`SequencePass`).
    ``fastv`` (:class:`~qcache_jax.lazy.fastv.FastV`): prune visual tokens after its layer,
    ranked by the attention of ``fastv_row`` [B] (default: each row's last valid token).
    ``out="kept"``: return FastV's kept visual tokens [B, T] bool instead.
    """
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    h = model.embed(input_ids, pixel_values, loop=loop)
    if lazy is None:
        lazy = Schedule.dense(model.cfg.text.num_layers)
    if fastv is not None and fastv_row is None:
        fastv_row = last_valid(valid)
    if fastv_row is not None:
        fastv_row = jnp.broadcast_to(jnp.asarray(fastv_row, jnp.int32), (b,))
    ctx = _sequence_pass(model, input_ids, valid, positions=positions, rope_positions=rope_positions,
                         segments=segments, fastv_row=fastv_row)
    res = run_layers(model.layers, h, ctx, attn=attn, lazy=lazy, cfg=model.cfg.text, loop=loop, fastv=fastv)
    return res.kept if out == "kept" else res.h


def sequence_logits(model, input_ids, pixel_values=None, attention_mask=None, lazy=None, *, attn, loop="scan",
                    fastv=None, fastv_row=None, rope_positions=None):
    """Full-sequence logits [B, T, V] float32 (see :func:`hidden_states`)."""
    return model.head(hidden_states(model, input_ids, pixel_values, attention_mask, lazy, attn=attn, loop=loop,
                                    fastv=fastv, fastv_row=fastv_row, rope_positions=rope_positions))


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "loop", "impl", "mesh", "fastv", "kept", "schedule"))
def logits_fn(graphdef, params, input_ids, pixel_values, attention_mask, lazy, *, mode, loop, impl, mesh=None,
              fastv=None, fastv_row=None, kept=False, schedule=None, rope_positions=None):
    """Jitted :func:`sequence_logits` over a parameter pytree; ``lazy`` None or a bool array [L]
    (traced: every schedule of a model shares one compilation). With a device ``mesh`` the
    attention runs per shard and the logits come out replicated. ``fastv`` (static) and
    ``fastv_row`` (traced): see :func:`hidden_states`; ``kept``: return FastV's kept visual
    tokens [B, T] instead of the logits. ``schedule``: a static :class:`Schedule` instead of
    ``lazy`` (one compilation per schedule; with ``loop="unroll"`` a GLA lazy layer's q/k
    projections are absent from the program, which a pruned checkpoint needs). ``rope_positions``
    (traced): the family's RoPE positions, see :func:`hidden_states`."""
    model = nnx.merge(graphdef, params)
    if schedule is not None:
        lazy = schedule
    attn = LazyAttention(mode=mode, impl=impl, mesh=mesh)
    if fastv is not None and lazy is None:
        lazy = jnp.zeros((model.cfg.text.num_layers,), bool)
    if kept:
        return hidden_states(model, input_ids, pixel_values, attention_mask, lazy, attn=attn, loop=loop, fastv=fastv,
                             fastv_row=fastv_row, out="kept", rope_positions=rope_positions)
    out = sequence_logits(model, input_ids, pixel_values, attention_mask, lazy, attn=attn, loop=loop, fastv=fastv,
                          fastv_row=fastv_row, rope_positions=rope_positions)
    if mesh is not None:
        out = jax.lax.with_sharding_constraint(out, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return out


def attention_probe(model, input_ids, pixel_values, valid, rows, *, loop="scan", impl="auto", mesh=None,
                    rope_positions=None):
    """Dense pass that returns every layer's attention probabilities of the query rows ``rows``
    [R]: [L, B, Hq, R, T] float32 (only those R rows of softmax(q K^T) are computed).
    ``rope_positions``: the family's, as :func:`hidden_states` takes them."""
    h = model.embed(input_ids, pixel_values, loop=loop)
    ctx = _sequence_pass(model, input_ids, valid, probe_rows=rows, rope_positions=rope_positions)
    dense = Schedule.dense(model.cfg.text.num_layers)
    attn = LazyAttention(impl=impl, mesh=mesh)
    out = run_layers(model.layers, h, ctx, attn=attn, lazy=dense, cfg=model.cfg.text, loop=loop)
    return jnp.stack(out.probes)


def prefill(model, schedule: Schedule, attn: LazyAttention, layout: CacheLayout, input_ids, prompt_len, pixel_values,
            *, loop="unroll", rope_positions=None, next_positions=None):
    """Run the prompts ``input_ids`` [B, T] (right-padded; ``prompt_len`` [B] real tokens) and
    create every layer's cache segments for ``layout``. Returns (state, logits [layout.batch,
    V] of each row's last token). ``layout.batch`` may exceed B: the extra rows are idle
    (empty segments), so a small batch is computed at its own size. ``rope_positions`` /
    ``next_positions`` [B]: the family's RoPE positions of the prompt (M-RoPE: [3, B, T]) and of
    each row's first generated token (default: the token index, ``prompt_len``).
    """
    b, t = input_ids.shape
    valid = jnp.arange(t)[None, :] < prompt_len[:, None]
    is_img = model.is_image(input_ids) & valid
    image_len = layout.image_len
    # Per row, the prompt positions of image tokens, then of text tokens, in order.
    img_idx = jnp.argsort(~is_img, axis=1, stable=True)[:, :image_len]
    img_idx = jnp.pad(img_idx, ((0, 0), (0, image_len - img_idx.shape[1])))
    txt_idx = jnp.argsort(~(valid & ~is_img), axis=1, stable=True)[:, : min(t, layout.text_len)]
    h = model.embed(input_ids, pixel_values, loop=loop)
    ctx = _sequence_pass(model, input_ids, valid, rope_positions=rope_positions, img_idx=img_idx, txt_idx=txt_idx,
                         text_len=layout.text_len,
                         fastv_row=None if layout.fastv is None else (prompt_len - 1).astype(jnp.int32))
    out = run_layers(model.layers, h, ctx, attn=attn, lazy=schedule, cfg=model.cfg.text, loop=loop,
                     fastv=layout.fastv)
    rows = jnp.arange(b)
    logits = model.head(out.h[rows, prompt_len - 1])
    n_img = is_img.sum(1).astype(jnp.int32)

    def rows_to(x):  # idle rows: zeros (empty segments, lengths 0)
        return fill_rows(x, layout.batch)

    caches = jax.tree.map(rows_to, out.caches)
    state = DecodingState(layers=caches, n_img=rows_to(n_img), n_txt=rows_to(prompt_len - n_img),
                          positions=rows_to(prompt_len if next_positions is None else next_positions))
    return state, rows_to(logits)


def decode_step(model, schedule: Schedule, attn: LazyAttention, state: DecodingState, tokens, *, loop="unroll",
                fastv=None, rows: int | None = None):
    """Logits [B, V] for ``tokens`` [B] fed at each row's next position; the state advanced.
    ``fastv``: the layout's (its layers above K hold the kept visual tokens only).

    ``rows`` (static, no mesh): only the first ``rows`` cache rows are live (a batch of one
    prompt in a two-row cache, :func:`~qcache_jax.runtime.engine.batch_bucket`). The layers'
    projections, MLPs and the head then run on those rows alone: XLA CPU multiplies one row
    by a weight matrix as a streaming GEMV, but two or more rows as a GEMM that repacks the
    whole matrix, which made the idle row cost about 0.7x a decode step. Attention still
    reads every cache row (its queries padded with zeros); the idle rows' logits are zero.
    """
    b = tokens.shape[0]
    live = b if rows is None else int(rows)
    if not 1 <= live <= b or (live < b and attn.mesh is not None):
        raise ValueError(f"decode_step: rows={rows} needs 1 <= rows <= {b} (the cache's rows) and no mesh")
    h = model.embed(tokens[:live, None])
    cos, sin = model.rope(state.positions[:live, None])
    ctx = DecodePass(cos=cos, sin=sin, n_img=state.n_img, n_txt=state.n_txt)
    out = run_layers(
        model.layers, h, ctx, attn=attn, lazy=schedule, cfg=model.cfg.text, caches=state.layers, loop=loop,
        fastv=fastv,
    )
    new_state = DecodingState(
        layers=out.caches, n_img=state.n_img, n_txt=state.n_txt + 1, positions=state.positions + 1
    )
    logits = model.head(out.h[:, 0])
    return new_state, fill_rows(logits, b)
