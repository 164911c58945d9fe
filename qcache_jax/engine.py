"""Jitted prefill and decode over the lazy KV cache, and the bucketed generate driver.

Decode runs a ``lax.while_loop`` inside one jitted call: sample, stop per row on EOS, at
``max_new_tokens`` or when the row's cache is full. Layers are unrolled with the schedule fixed
at trace time (method.md: a scan that slices per-layer caches copies them every step).
Shapes are bucketed (powers of two) and compiled executables are kept per bucket, so a new
prompt of a known bucket never recompiles; the decoding state is donated and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cache import CacheLayout, DecodingState, dense_kv_cache_bytes, init_state, kv_cache_bytes
from .errors import QCacheError
from .layers import unstack
from .lazy_attention import LazyAttention
from .sampling import sample
from .schedule import anchors

# CPU cannot always reuse donated buffers; the donation still matters on GPU/TPU.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled prefill/decode pair."""

    layout: CacheLayout
    prompt_len: int  # T: padded prompt length
    text_prompt_len: int  # text tokens of the prompt written to the cache (<= T)
    n_images: int  # padded image count of the batch
    max_new: int  # token buffer size (a bucket of max_new_tokens)
    attn: LazyAttention
    eos: tuple[int, ...]
    pad_id: int
    keep_logits: bool = False  # also return each emitted token's logits [B, max_new, V]


def _prefill(graphdef, plan: Plan, params, state: DecodingState, input_ids, prompt_len, pixel_values):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    b, t = input_ids.shape
    layout = plan.layout
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < prompt_len[:, None]
    is_img = (input_ids == cfg.image_token_id) & valid
    h = model.embed(input_ids, pixel_values)
    cos, sin = model.rope(positions)
    # Per row, the prompt positions of image tokens, then of text tokens, in order.
    img_idx = jnp.argsort(~is_img, axis=1, stable=True)[:, : layout.image_len]
    img_idx = jnp.pad(img_idx, ((0, 0), (0, layout.image_len - img_idx.shape[1])))
    txt_idx = jnp.argsort(~(valid & ~is_img), axis=1, stable=True)[:, : plan.text_prompt_len]
    qc, new_layers = None, []
    for i, layer in enumerate(unstack(model.language_model.layers)):
        attn, qc, cache = plan.attn.prefill(
            layer,
            layer.attn_input(h),
            cos,
            sin,
            positions,
            valid,
            is_img,
            qc,
            layout.schedule[i],
            state.layers[i],
            img_idx,
            txt_idx,
        )
        new_layers.append(cache)
        h = layer.output(h, attn)
    rows = jnp.arange(b)
    last = prompt_len - 1
    logits = model.head(h[rows, last])
    n_img = is_img.sum(1).astype(jnp.int32)
    new_state = DecodingState(
        layers=tuple(new_layers),
        q_cache=qc.q[rows, last].astype(state.q_cache.dtype),
        n_img=n_img,
        n_txt=prompt_len - n_img,
        positions=prompt_len,
    )
    return new_state, logits


def _decode_step(model, plan: Plan, state: DecodingState, tokens):
    """Logits [B, V] for ``tokens`` [B] fed at each row's next position; state updated."""
    layout = plan.layout
    h = model.embed(tokens[:, None])
    cos, sin = model.rope(state.positions[:, None])
    caches = list(state.layers)
    anchor_of = anchors(layout.schedule)
    # An anchor hands its probabilities to its lazy block only in GLA mode, and only if it has one.
    has_block = {anchor_of[i] for i in range(len(anchor_of)) if layout.schedule[i]}
    carry = None
    for i, layer in enumerate(unstack(model.language_model.layers)):
        out, carry = plan.attn.decode(
            layer,
            layer.attn_input(h),
            cos,
            sin,
            i,
            layout.schedule[i],
            caches,
            state.n_img,
            state.n_txt,
            carry,
            gla_block=plan.attn.mode == "gla" and i in has_block,
        )
        h = layer.output(h, out[:, None])
    new_state = DecodingState(
        layers=tuple(caches),
        q_cache=carry.q.astype(state.q_cache.dtype),
        n_img=state.n_img,
        n_txt=state.n_txt + 1,
        positions=state.positions + 1,
    )
    return new_state, model.head(h[:, 0])


def _next_token(plan: Plan, logits, key, done, step, state, max_new, temperature, top_k, top_p):
    """Each row's next token (pad for finished rows), the new key, and the rows now finished:
    on EOS, at ``max_new`` tokens, or when the row's cache has no slot left to feed the token."""
    key, sub = jax.random.split(key)
    tok = jnp.where(done, plan.pad_id, sample(logits, sub, temperature, top_k, top_p))
    eos = jnp.asarray(plan.eos if plan.eos else (-1,), jnp.int32)
    done = done | jnp.isin(tok, eos) | (step + 1 >= max_new) | (state.n_txt >= plan.layout.text_len)
    return tok, key, done


def _decode_loop(graphdef, plan: Plan, params, state, logits, key, max_new, temperature, top_k, top_p, active):
    """Sample up to ``max_new`` tokens per row in one ``lax.while_loop``.

    Returns (state, tokens [B, plan.max_new], counts [B], logits [B, plan.max_new, V] or None).
    """
    model = nnx.merge(graphdef, params)
    b = logits.shape[0]

    def emit(step, logits, key, tokens, done, count, state, kept):
        if kept is not None:
            kept = kept.at[:, step].set(logits)
        count = count + (~done).astype(jnp.int32)
        tok, key, done = _next_token(plan, logits, key, done, step, state, max_new, temperature, top_k, top_p)
        return tok, key, tokens.at[:, step].set(tok), done, count, kept

    tokens = jnp.full((b, plan.max_new), plan.pad_id, jnp.int32)
    kept = jnp.zeros((b, plan.max_new, logits.shape[-1]), jnp.float32) if plan.keep_logits else None
    count = jnp.zeros((b,), jnp.int32)
    tok, key, tokens, done, count, kept = emit(0, logits, key, tokens, ~active, count, state, kept)

    def cond(c):
        step, done = c[0], c[4]
        return (step < max_new) & ~jnp.all(done)

    def body(c):
        step, state, tok, key, done, tokens, count, kept = c
        state, logits = _decode_step(model, plan, state, tok)
        tok, key, tokens, done, count, kept = emit(step, logits, key, tokens, done, count, state, kept)
        return step + 1, state, tok, key, done, tokens, count, kept

    init = (jnp.int32(1), state, tok, key, done, tokens, count, kept)
    _, state, _, _, _, tokens, count, kept = jax.lax.while_loop(cond, body, init)
    return state, tokens, count, kept


def _stream_step(graphdef, plan: Plan, params, state, logits, key, step, max_new, temperature, top_k, top_p, done):
    """One streamed step: sample from ``logits``, feed the tokens, return the next logits."""
    model = nnx.merge(graphdef, params)
    tok, key, new_done = _next_token(plan, logits, key, done, step, state, max_new, temperature, top_k, top_p)
    state, logits = _decode_step(model, plan, state, tok)
    return state, logits, key, tok, new_done


@dataclasses.dataclass
class GenerateOutput:
    """Result of :meth:`Engine.generate` for a batch of prompts."""

    token_ids: list[list[int]]
    kv_cache_bytes: int
    dense_kv_cache_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int
    compile_seconds: float
    layout: CacheLayout
    logits: list | None = None  # per prompt [n_generated, V] when the plan keeps logits

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Engine:
    """Compiles and runs prefill + decode for one model, keeping executables and states per bucket."""

    def __init__(self, graphdef, params, cfg, *, attention_impl: str = "auto"):
        self.graphdef, self.params, self.cfg = graphdef, params, cfg
        self.attention_impl = attention_impl
        self.dtype = jax.tree.leaves(params)[0].dtype
        self._compiled: dict = {}
        self._states: dict = {}

    def plan(
        self,
        prompts,
        n_images_per_row,
        *,
        schedule,
        mode,
        max_new_tokens,
        eos,
        pad_id,
        cache_len=None,
        reuse_probs=True,
        keep_logits=False,
    ) -> Plan:
        """The static shapes (buckets) and options for generating ``prompts``."""
        cfg = self.cfg
        n_prompt = max(len(p) for p in prompts)
        per_image = cfg.image_tokens_per_image
        n_img_tokens = [k * per_image for k in n_images_per_row]
        n_text = max(len(p) - k for p, k in zip(prompts, n_img_tokens))
        imgs_per_row = max(n_images_per_row)
        image_len = (bucket(imgs_per_row, 1) if imgs_per_row else 0) * per_image
        text_prompt = bucket(n_text)
        text_len = text_prompt + bucket(max_new_tokens)
        if cache_len is not None:
            # An explicit capacity (tokens per row, both segments) is exact, and a hard limit.
            text_len = cache_len - image_len
            if n_prompt > cache_len or n_text > text_len:
                raise QCacheError(f"prompt of {n_prompt} tokens does not fit the cache of {cache_len} tokens per row")
            text_prompt = min(text_prompt, text_len)
        layout = CacheLayout(
            batch=bucket(len(prompts), 1), image_len=image_len, text_len=text_len, schedule=tuple(schedule), mode=mode
        )
        return Plan(
            layout=layout,
            prompt_len=bucket(n_prompt),
            text_prompt_len=text_prompt,
            n_images=bucket(sum(n_images_per_row), 1) if any(n_images_per_row) else 0,
            max_new=bucket(max_new_tokens),
            attn=LazyAttention(mode=mode, impl=self.attention_impl, reuse_probs=reuse_probs),
            eos=tuple(eos),
            pad_id=pad_id,
            keep_logits=keep_logits,
        )

    def _executables(self, plan: Plan, args_prefill, args_decode_shapes):
        """(prefill, decode, seconds spent compiling now): compiled once per plan, then reused."""
        if plan in self._compiled:
            return (*self._compiled[plan], 0.0)
        t0 = time.perf_counter()
        prefill = jax.jit(functools.partial(_prefill, self.graphdef, plan), donate_argnums=(1,))
        decode = jax.jit(functools.partial(_decode_loop, self.graphdef, plan), donate_argnums=(1,))
        cp = prefill.lower(*args_prefill).compile()
        state_shape, logits_shape = jax.eval_shape(prefill, *args_prefill)
        cd = decode.lower(self.params, state_shape, logits_shape, *args_decode_shapes).compile()
        self._compiled[plan] = (cp, cd)
        return cp, cd, time.perf_counter() - t0

    def _prepare(self, prompts, pixel_values, plan: Plan):
        """Padded device inputs and a (reused or new) decoding state for ``plan``."""
        layout = plan.layout
        b = layout.batch
        ids = np.full((b, plan.prompt_len), plan.pad_id, np.int32)
        lens = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            lens[i] = len(p)
        pv = None
        if plan.n_images:
            pv = np.zeros((plan.n_images, *pixel_values.shape[1:]), np.float32)
            pv[: len(pixel_values)] = pixel_values
            pv = jnp.asarray(pv)
        state = self._states.pop(layout, None)
        if state is None:
            state = jax.jit(init_state, static_argnums=(0, 1, 2))(layout, self.cfg.text, self.dtype)
        active = jnp.asarray(np.arange(b) < len(prompts))
        return (self.params, state, jnp.asarray(ids), jnp.asarray(lens), pv), active

    def stream(self, prompts, pixel_values, plan: Plan, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0):
        """Yield each step's tokens as a list (None for rows already finished), step by step.

        A Python loop over one jitted decode step: slower than :meth:`generate`'s
        ``lax.while_loop``, but tokens arrive as they are made (the CLI's ``--stream``).
        """
        args_prefill, active = self._prepare(prompts, pixel_values, plan)
        key = jax.random.PRNGKey(seed)
        sampling = (jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        prefill, _, _ = self._executables(plan, args_prefill, (key, *sampling, active))
        if (plan, "stream") not in self._compiled:
            step = functools.partial(_stream_step, self.graphdef, plan)
            self._compiled[(plan, "stream")] = jax.jit(step, donate_argnums=(1,))
        step_fn = self._compiled[(plan, "stream")]
        state, logits = prefill(*args_prefill)
        done = ~active
        for step in range(max_new_tokens):
            state, logits, key, tok, new_done = step_fn(
                self.params, state, logits, key, jnp.int32(step), *sampling, done
            )
            tok, was_done = np.asarray(tok), np.asarray(done)
            yield [None if was_done[i] else int(tok[i]) for i in range(len(prompts))]
            done = new_done
            if bool(np.all(np.asarray(done))):
                break
        self._states[plan.layout] = state

    def generate(
        self,
        prompts,
        pixel_values,
        n_images_per_row,
        plan: Plan,
        *,
        max_new_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
    ) -> GenerateOutput:
        """Generate for ``prompts`` (lists of token ids, image tokens expanded) under ``plan``."""
        layout = plan.layout
        args_prefill, active = self._prepare(prompts, pixel_values, plan)
        scalars = (
            jax.random.PRNGKey(seed),
            jnp.int32(max_new_tokens),
            jnp.float32(temperature),
            jnp.int32(top_k),
            jnp.float32(top_p),
            active,
        )
        prefill, decode, compile_s = self._executables(plan, args_prefill, scalars)
        t0 = time.perf_counter()
        state, logits = prefill(*args_prefill)
        logits.block_until_ready()
        t1 = time.perf_counter()
        state, tokens, counts, kept = decode(self.params, state, logits, *scalars)
        tokens = np.asarray(tokens)
        t2 = time.perf_counter()
        counts = np.asarray(counts)
        self._states[layout] = state
        out = [tokens[i, : counts[i]].tolist() for i in range(len(prompts))]
        return GenerateOutput(
            token_ids=out,
            kv_cache_bytes=kv_cache_bytes(state),
            dense_kv_cache_bytes=dense_kv_cache_bytes(layout, self.cfg.text, self.dtype),
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            # The first token comes from the prefill logits; the loop ran max(counts) - 1 steps.
            decode_tokens=int(sum(max(c - 1, 0) for c in counts)),
            compile_seconds=compile_s,
            layout=layout,
            logits=None if kept is None else [np.asarray(kept[i, : counts[i]]) for i in range(len(prompts))],
        )
