"""Jitted prefill and decode over the lazy KV cache, and the bucketed generate driver.

Decode runs a ``lax.while_loop`` inside one jitted call: sample, stop per row on EOS, at
``max_new_tokens`` or when the row's cache is full. Layers are unrolled with the schedule fixed
at trace time and every layer reads its own weight and cache arrays in place (no per-step
slice or transpose copies; tests/test_hlo.py checks the optimized HLO). Shapes are bucketed
(:func:`bucket`) and compiled executables are kept per plan, so a new prompt of a known bucket
never recompiles; prefill creates the decoding state and the decode loop updates it in place
(donated).

With a device mesh (:mod:`qcache_jax.runtime.mesh`) the same executables are compiled with
shardings: parameters in theirs, prompt rows and the decoding state on ``data`` (KV heads on
``model``), the emitted tokens replicated so that every process reads them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import QCacheError
from ..lazy.attention import LazyAttention
from ..lazy.cache import CacheLayout, DecodingState, layout_kv_bytes
from ..lazy.fastv import FastV
from ..lazy.schedule import Schedule
from ..host_memory import release_freed
from . import forward
from .buckets import bucket, pow2
from .images import image_inputs
from .sampling import sample

def batch_bucket(n: int) -> int:
    """Rows allocated for ``n`` prompts: a power of two from 2 up to 8, then a multiple of 8 (a
    large batch wastes at most 7 rows of KV cache).

    Never 1: with a batch of one, XLA CPU removes the size-1 batch dimension from the attention's
    dot, fuses the cache write into that bitcast as a second copy of the write, and then copies
    every written cache segment several times per decode step (tests/test_hlo.py). A second,
    idle row costs one more row of KV cache and nothing on the weights, which every row shares.
    """
    return max(2, pow2(n)) if n <= 8 else -(-int(n) // 8) * 8


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled prefill/decode pair."""

    layout: CacheLayout
    prefill_batch: int  # rows the prefill computes (<= layout.batch: cache rows beyond it idle)
    prompt_len: int  # T: padded prompt length
    n_images: int  # padded image count of the batch (LLaVA-NeXT: padded view count, base views + tiles)
    max_new: int  # token buffer size (a bucket of max_new_tokens)
    attn: LazyAttention
    eos: tuple[int, ...]
    pad_id: int
    keep_logits: bool = False  # also return each emitted token's logits [B, max_new, V]
    loop: str = "unroll"
    n_image_tokens: int = 0  # LLaVA-NeXT: padded image-token count of the batch (the packing index)

    @property
    def live_rows(self) -> int | None:
        """Rows a decode step computes, when fewer than the cache's (a single prompt in a
        two-row cache): :func:`~qcache_jax.runtime.forward.decode_step`'s ``rows``. None: all
        (also with a mesh, whose shards split the cache's rows)."""
        if self.attn.mesh is not None or self.prefill_batch >= self.layout.batch:
            return None
        return self.prefill_batch

    @property
    def schedule(self) -> Schedule:
        return self.layout.schedule


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Sampling settings as traced scalars: changing them never recompiles."""

    key: jax.Array
    max_new: jax.Array  # int32: tokens to generate per row (<= the plan's max_new)
    temperature: jax.Array  # float32; <= 0 is greedy
    top_k: jax.Array  # int32; <= 0 is off
    top_p: jax.Array  # float32; >= 1 is off

    @classmethod
    def make(cls, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> "Sampling":
        return cls(
            jax.random.PRNGKey(seed),
            jnp.int32(max_new_tokens),
            jnp.float32(temperature),
            jnp.int32(top_k),
            jnp.float32(top_p),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoopState:
    """The decode loop's carry: the decoding state plus what sampling tracks per row."""

    step: jax.Array
    state: DecodingState
    token: jax.Array  # [B] the token fed next
    key: jax.Array
    done: jax.Array  # [B] finished rows
    tokens: jax.Array  # [B, max_new] emitted tokens
    count: jax.Array  # [B] tokens emitted per row
    kept: jax.Array | None  # [B, max_new, V] logits of emitted tokens, when the plan keeps them


def _prefill(graphdef, plan: Plan, params, input_ids, prompt_len, pixel_values, rope=None):
    """``rope``: None (RoPE positions are token indices) or the family's (positions, next
    positions) (Qwen2-VL's M-RoPE, computed on the host by :meth:`Engine.prepare`)."""
    model = nnx.merge(graphdef, params)
    positions, nxt = (None, None) if rope is None else rope
    return forward.prefill(
        model, plan.schedule, plan.attn, plan.layout, input_ids, prompt_len, pixel_values, loop=plan.loop,
        rope_positions=positions, next_positions=nxt,
    )


def _next_token(plan: Plan, logits, key, done, step, state: DecodingState, s: Sampling):
    """Each row's next token (pad for finished rows), the new key, and the rows now finished:
    on EOS, at ``max_new`` tokens, or when the row's cache has no slot left to feed the token."""
    key, sub = jax.random.split(key)
    tok = jnp.where(done, plan.pad_id, sample(logits, sub, s.temperature, s.top_k, s.top_p))
    eos = jnp.asarray(plan.eos if plan.eos else (-1,), jnp.int32)
    done = done | jnp.isin(tok, eos) | (step + 1 >= s.max_new) | (state.n_txt >= plan.layout.text_len)
    return tok, key, done


def _emit(plan: Plan, c: LoopState, logits, s: Sampling) -> LoopState:
    kept = c.kept.at[:, c.step].set(logits) if c.kept is not None else None
    count = c.count + (~c.done).astype(jnp.int32)
    tok, key, done = _next_token(plan, logits, c.key, c.done, c.step, c.state, s)
    return dataclasses.replace(
        c, token=tok, key=key, tokens=c.tokens.at[:, c.step].set(tok), done=done, count=count, kept=kept
    )


def _decode_loop(graphdef, plan: Plan, params, state, logits, s: Sampling, active):
    """Sample up to ``s.max_new`` tokens per row in one ``lax.while_loop``; returns the final
    :class:`LoopState`."""
    model = nnx.merge(graphdef, params)
    b = logits.shape[0]
    c = LoopState(
        step=jnp.int32(0),
        state=state,
        token=jnp.zeros((b,), jnp.int32),
        key=s.key,
        done=~active,
        tokens=jnp.full((b, plan.max_new), plan.pad_id, jnp.int32),
        count=jnp.zeros((b,), jnp.int32),
        kept=jnp.zeros((b, plan.max_new, logits.shape[-1]), jnp.float32) if plan.keep_logits else None,
    )
    c = dataclasses.replace(_emit(plan, c, logits, s), step=jnp.int32(1))

    def cond(c: LoopState):
        return (c.step < s.max_new) & ~jnp.all(c.done)

    def body(c: LoopState):
        new_state, logits = forward.decode_step(model, plan.schedule, plan.attn, c.state, c.token, loop=plan.loop,
                                                fastv=plan.layout.fastv, rows=plan.live_rows)
        c = _emit(plan, dataclasses.replace(c, state=new_state), logits, s)
        return dataclasses.replace(c, step=c.step + 1)

    return jax.lax.while_loop(cond, body, c)


def _stream_step(graphdef, plan: Plan, params, state, logits, key, step, s: Sampling, done):
    """One streamed step: sample from ``logits``, feed the tokens, return the next logits."""
    model = nnx.merge(graphdef, params)
    tok, key, new_done = _next_token(plan, logits, key, done, step, state, s)
    state, logits = forward.decode_step(model, plan.schedule, plan.attn, state, tok, loop=plan.loop,
                                        fastv=plan.layout.fastv, rows=plan.live_rows)
    return state, logits, key, tok, new_done


@dataclasses.dataclass
class Batch:
    """A prepared batch: padded device inputs for a plan's prefill and the rows that are real."""

    input_ids: jax.Array  # [B, T]
    prompt_len: jax.Array  # [B]
    pixel_values: jax.Array | None
    active: jax.Array  # [B] bool
    n_rows: int  # real prompts (the rest is batch padding)
    rope: tuple | None = None  # Qwen2-VL: (M-RoPE positions [3, B, T], next positions [B])


@dataclasses.dataclass
class GenerateOutput:
    """Result of :meth:`Engine.generate` for a batch of prompts."""

    token_ids: list[list[int]]
    kv_cache_bytes: int
    dense_kv_cache_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int
    decode_steps: int
    compile_seconds: float
    layout: CacheLayout
    logits: list | None = None  # per prompt [n_generated, V] when the plan keeps logits

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Engine:
    """Compiles and runs prefill + decode for one model, keeping the executables per plan.

    ``log``: called with a message before anything slow (compiling a new plan).
    """

    def __init__(self, graphdef, params, cfg, *, attention_impl: str = "auto", log: Callable[[str], None] | None = None,
                 mesh=None):
        self.graphdef, self.params, self.cfg = graphdef, params, cfg
        self.images = image_inputs(cfg)  # the family's image inputs: buckets, structs, host arrays
        self.attention_impl = attention_impl
        self.mesh = mesh  # a jax.sharding.Mesh (axes data, model) or None: one device
        self.dtype = jax.tree.leaves(params)[0].dtype
        self.log = log
        self._compiled: dict = {}

    # -- planning -------------------------------------------------------------------------------

    def plan(
        self,
        prompts,
        n_images_per_row,
        *,
        schedule: Schedule,
        max_new_tokens: int,
        eos=(),
        pad_id: int = 0,
        cache_len: int | None = None,
        max_context: int | None = None,
        reuse_probs: bool = True,
        keep_logits: bool = False,
        loop: str = "unroll",
        fastv: FastV | None = None,
    ) -> Plan:
        """The static shapes (buckets) and options for generating ``prompts`` (token lists).

        Raises QCacheError before anything is allocated when the longest prompt plus
        ``max_new_tokens`` exceeds ``max_context`` (default: the model's
        ``max_position_embeddings``), or a prompt does not fit an explicit ``cache_len``.
        ``fastv``: prune visual tokens after its layer (the schedule is cut there, and the
        layers above it get shorter visual segments).
        """
        cfg = self.cfg
        n_prompt = max(len(p) for p in prompts)
        context = cfg.text.max_position_embeddings if max_context is None else int(max_context)
        if n_prompt + max_new_tokens > context:
            room = context - n_prompt
            hint = f"; at most {room} new tokens fit" if room > 0 else ""
            raise QCacheError(
                f"prompt of {n_prompt} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
                f"{context} tokens{hint} (raise the limit with --max-context / max_context= at your own risk)"
            )
        images = self.images.plan(prompts, n_images_per_row)
        image_len, n_text = images.image_len, images.n_text
        text_len = bucket(n_text) + bucket(max_new_tokens)
        if cache_len is not None:
            # An explicit capacity (tokens per row, both segments) is exact, and a hard limit.
            text_len = cache_len - image_len
            if n_prompt > cache_len or n_text > text_len:
                raise QCacheError(f"prompt of {n_prompt} tokens does not fit the cache of {cache_len} tokens per row")
        rows = batch_bucket(len(prompts))
        prefill_rows = pow2(len(prompts)) if len(prompts) <= 8 else rows
        if self.mesh is not None:  # rows split over the data axis: a multiple of it
            from .mesh import round_rows

            rows, prefill_rows = round_rows(rows, self.mesh), round_rows(prefill_rows, self.mesh)
        if fastv is not None:
            schedule = fastv.cut(schedule)
        layout = CacheLayout(batch=rows, image_len=image_len, text_len=text_len, schedule=schedule, fastv=fastv)
        return Plan(
            layout=layout,
            prefill_batch=prefill_rows,
            prompt_len=bucket(n_prompt),
            n_images=images.n_images,
            max_new=pow2(max(max_new_tokens, 16)),
            attn=LazyAttention(mode=schedule.mode, impl=self.attention_impl, reuse_probs=reuse_probs, mesh=self.mesh),
            eos=tuple(eos),
            pad_id=pad_id,
            keep_logits=keep_logits,
            loop=loop,
            n_image_tokens=images.n_image_tokens,
        )

    def kv_bytes(self, plan: Plan) -> tuple[int, int]:
        """(KV cache bytes, dense KV cache bytes) of the plan's cache (from its array shapes)."""
        return layout_kv_bytes(plan.layout, self.cfg.text, self.dtype)

    # -- compiling ------------------------------------------------------------------------------

    def _abstract_inputs(self, plan: Plan):
        """(ids, prompt lengths, pixels, rope) as ShapeDtypeStructs: what the prefill takes."""
        b = plan.prefill_batch
        pv, rope = self.images.abstract(plan)
        return jax.ShapeDtypeStruct((b, plan.prompt_len), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32), pv, rope

    def compile(self, plan: Plan) -> float:
        """Compile the plan's prefill and decode loop (once per plan); returns the seconds spent
        compiling now (0 when they were compiled already)."""
        if plan in self._compiled:
            return 0.0
        if self.log:
            lazy = plan.schedule.describe()
            self.log(
                f"compiling prefill + decode for batch {plan.layout.batch}, prompt {plan.prompt_len} tokens, "
                f"up to {plan.max_new} new tokens, lazy layers {lazy} (first use of this shape)..."
            )
        t0 = time.perf_counter()
        ids, lens, pv, rope = self._abstract_inputs(plan)
        sampling = jax.eval_shape(lambda: Sampling.make(1))
        active = jax.ShapeDtypeStruct((plan.layout.batch,), jnp.bool_)
        if self.mesh is not None:
            self._compiled[plan] = self._compile_sharded(plan, ids, lens, pv, rope, sampling, active)
            release_freed()
            return time.perf_counter() - t0
        prefill = jax.jit(functools.partial(_prefill, self.graphdef, plan))
        decode = jax.jit(functools.partial(_decode_loop, self.graphdef, plan), donate_argnums=(1,))
        cp = prefill.lower(self.params, ids, lens, pv, rope).compile()
        state_out, logits = jax.eval_shape(prefill, self.params, ids, lens, pv, rope)
        cd = decode.lower(self.params, state_out, logits, sampling, active).compile()
        self._compiled[plan] = (cp, cd)
        release_freed()  # the compiler's freed heap, else resident for the process's life
        return time.perf_counter() - t0

    # -- a device mesh ----------------------------------------------------------------------------

    def shardings(self, plan: Plan) -> dict:
        """The NamedShardings of the plan's executables (mesh only): ``params``, ``ids`` and
        ``lens`` (prompt rows), ``pixels`` (replicated), ``state`` (the DecodingState),
        ``logits``, ``active``, ``replicated``."""
        from . import mesh as m

        key = (plan, "shardings")
        if key not in self._compiled:
            mesh, b = self.mesh, plan.prefill_batch
            ids, lens, pv, rope = self._abstract_inputs(plan)
            state, logits = jax.eval_shape(functools.partial(_prefill, self.graphdef, plan), self.params, ids, lens, pv,
                                           rope)
            self._compiled[key] = {
                "params": m.param_shardings(self.params, self.cfg, mesh),
                "ids": m.named(m.rows_spec(b, mesh, 2), mesh),
                "lens": m.named(m.rows_spec(b, mesh), mesh),
                "pixels": None if pv is None else jax.tree.map(lambda _: m.replicated(mesh), pv),
                "rope": None if rope is None else jax.tree.map(lambda _: m.replicated(mesh), rope),
                "state": m.named(m.state_specs(state, mesh), mesh),
                "logits": m.named(m.rows_spec(logits.shape[0], mesh, 2), mesh),
                "active": m.named(m.rows_spec(plan.layout.batch, mesh), mesh),
                "replicated": m.replicated(mesh),
            }
        return self._compiled[key]

    def _compile_sharded(self, plan: Plan, ids, lens, pv, rope, sampling, active):
        """Prefill and decode compiled with in/out shardings on the mesh; the loop's outputs
        other than the state (tokens, counts, kept logits) come out replicated."""
        sh = self.shardings(plan)
        rep = sh["replicated"]
        prefill = jax.jit(
            functools.partial(_prefill, self.graphdef, plan),
            in_shardings=(sh["params"], sh["ids"], sh["lens"], sh["pixels"], sh["rope"]),
            out_shardings=(sh["state"], sh["logits"]),
        )
        cp = prefill.lower(self.params, ids, lens, pv, rope).compile()
        state_out, logits = jax.eval_shape(prefill, self.params, ids, lens, pv, rope)
        samp = jax.tree.map(lambda _: rep, sampling)
        loop_out = LoopState(step=rep, state=sh["state"], token=rep, key=rep, done=rep, tokens=rep, count=rep,
                             kept=rep if plan.keep_logits else None)
        decode = jax.jit(
            functools.partial(_decode_loop, self.graphdef, plan),
            in_shardings=(sh["params"], sh["state"], sh["logits"], samp, sh["active"]),
            out_shardings=loop_out,
            donate_argnums=(1,),
        )
        cd = decode.lower(self.params, state_out, logits, sampling, active).compile()
        return cp, cd

    def _put(self, x, sharding):
        """A host value as a device array: plain ``jnp.asarray`` on one device, else placed in
        ``sharding`` on the mesh (every process gives the same value)."""
        if self.mesh is None:
            return jnp.asarray(x)
        from .mesh import put

        return put(x, sharding)

    def sampling(self, sampling: Sampling) -> Sampling:
        """``sampling`` as the executables take it (replicated on a mesh)."""
        if self.mesh is None:
            return sampling
        from .mesh import put, replicated

        return jax.tree.map(lambda x: put(x, replicated(self.mesh)), sampling)

    def decode_executable(self, plan: Plan):
        """The compiled decode loop of ``plan`` (compiling it if needed): ``(params, state,
        logits, Sampling, active) -> LoopState``."""
        self.compile(plan)
        return self._compiled[plan][1]

    # -- running --------------------------------------------------------------------------------

    def prepare(self, prompts, pixel_values, plan: Plan) -> Batch:
        """Padded device inputs for ``plan``: prompts right-padded with the pad id, rows and
        images padded to the plan's buckets."""
        b = plan.prefill_batch
        ids = np.full((b, plan.prompt_len), plan.pad_id, np.int32)
        lens = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
            lens[i] = len(p)
        sh = self.shardings(plan) if self.mesh is not None else None
        pv, rope = self.images.prepare(ids, lens, pixel_values, plan)  # host arrays in the plan's buckets
        if sh is None:
            pv, rope = jax.tree.map(jnp.asarray, pv), jax.tree.map(jnp.asarray, rope)
        else:
            pv = None if pv is None else jax.tree.map(self._put, pv, sh["pixels"])
            rope = None if rope is None else jax.tree.map(self._put, rope, sh["rope"])
        active = np.arange(plan.layout.batch) < len(prompts)
        if sh is None:
            return Batch(jnp.asarray(ids), jnp.asarray(lens), pv, jnp.asarray(active), len(prompts), rope)
        return Batch(self._put(ids, sh["ids"]), self._put(lens, sh["lens"]), pv, self._put(active, sh["active"]),
                     len(prompts), rope)

    def prefill(self, plan: Plan, batch: Batch):
        """(decoding state, logits [B, V] of each row's last prompt token); compiles the plan
        if needed."""
        self.compile(plan)
        return self._compiled[plan][0](self.params, batch.input_ids, batch.prompt_len, batch.pixel_values, batch.rope)

    def decode(self, plan: Plan, state, logits, sampling: Sampling, active) -> LoopState:
        """Run the compiled decode loop from the prefill's ``state`` and ``logits``."""
        return self.decode_executable(plan)(self.params, state, logits, self.sampling(sampling), active)

    def generate(self, prompts, pixel_values, plan: Plan, sampling: Sampling) -> GenerateOutput:
        """Generate for ``prompts`` (lists of token ids, image tokens expanded) under ``plan``."""
        compile_s = self.compile(plan)
        release_freed()  # what earlier calls freed (a larger batch's prefill temporaries)
        batch = self.prepare(prompts, pixel_values, plan)
        t0 = time.perf_counter()
        state, logits = self.prefill(plan, batch)
        logits.block_until_ready()
        t1 = time.perf_counter()
        out = self.decode(plan, state, logits, sampling, batch.active)
        tokens = np.asarray(out.tokens)
        t2 = time.perf_counter()
        counts = np.asarray(out.count)
        kept = None if out.kept is None else np.asarray(out.kept)
        kv, dense = self.kv_bytes(plan)
        n = batch.n_rows
        return GenerateOutput(
            token_ids=[tokens[i, : counts[i]].tolist() for i in range(n)],
            kv_cache_bytes=kv,
            dense_kv_cache_bytes=dense,
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            # The first token comes from the prefill logits; the loop ran max(counts) - 1 steps.
            decode_tokens=int(sum(max(c - 1, 0) for c in counts[:n])),
            decode_steps=int(np.asarray(out.step)) - 1,
            compile_seconds=compile_s,
            layout=plan.layout,
            # Sliced on the host: slicing the device array compiles a new slice per token count.
            logits=None if out.kept is None else [kept[i, : counts[i]].copy() for i in range(n)],
        )

    def stream(self, prompts, pixel_values, plan: Plan, sampling: Sampling, max_new_tokens: int, stats: dict | None = None):
        """Yield each step's tokens as a list (None for rows already finished), step by step.

        A Python loop over one jitted decode step: slower than :meth:`generate`'s
        ``lax.while_loop``, but tokens arrive as they are made (the CLI's ``--stream``).
        ``stats``, when given, receives ``compile_seconds``, ``prefill_seconds``,
        ``kv_cache_bytes``, ``dense_kv_cache_bytes`` and ``schedule`` before the first token.
        """
        compile_s = self.compile(plan)
        release_freed()  # as generate does
        batch = self.prepare(prompts, pixel_values, plan)
        key = (plan, "stream")
        if key not in self._compiled:
            step = functools.partial(_stream_step, self.graphdef, plan)
            if self.mesh is None:
                self._compiled[key] = jax.jit(step, donate_argnums=(1,))
            else:  # the state stays in its shardings; what the host reads comes out replicated
                sh = self.shardings(plan)
                rep = sh["replicated"]
                self._compiled[key] = jax.jit(step, donate_argnums=(1,),
                                              out_shardings=(sh["state"], sh["logits"], rep, rep, rep))
        step_fn = self._compiled[key]
        sampling = self.sampling(sampling)
        t0 = time.perf_counter()
        state, logits = self.prefill(plan, batch)
        logits.block_until_ready()
        if stats is not None:
            kv, dense = self.kv_bytes(plan)
            stats.update(compile_seconds=compile_s, prefill_seconds=time.perf_counter() - t0, kv_cache_bytes=kv,
                         dense_kv_cache_bytes=dense, schedule=plan.schedule)
        done, rng = ~batch.active, sampling.key
        for n in range(max_new_tokens):
            step = jnp.int32(n) if self.mesh is None else self._put(np.int32(n), self.shardings(plan)["replicated"])
            state, logits, rng, tok, new_done = step_fn(self.params, state, logits, rng, step, sampling, done)
            tok, was_done = np.asarray(tok), np.asarray(done)
            yield [None if was_done[i] else int(tok[i]) for i in range(batch.n_rows)]
            done = new_done
            if bool(np.all(np.asarray(done))):
                break

