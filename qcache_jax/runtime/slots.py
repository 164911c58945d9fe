"""Serving slots: a fixed pool of S sequences decoded together, each admitted and released on
its own (continuous batching), with JetStream's engine API: ``prefill`` a request into a
one-row state, ``insert`` it into a free slot, ``step`` every slot by one token, ``release``.

The pool is one :class:`~qcache_jax.lazy.cache.DecodingState` of S rows built on the same
layer stack, lazy caches and kernels as ``generate``: every slot has its own visual and text
segments (capacity ``image_len`` and ``text_len``), lengths and position, so requests of
different lengths share a step. A GLA or VLA schedule stores fewer key arrays, so the same
memory holds more slots (:func:`slots_for_budget`, from the real array shapes).

Executables (each compiled once, counted in :attr:`SlotEngine.compiles`): one decode step for
the pool, one insert, one release, and one prefill per (prompt bucket, image count). The pool
is donated to step / insert / release, so its caches are updated in place.
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
from ..lazy.cache import CacheLayout, DecodingState, init_state, layout_kv_bytes
from ..lazy.schedule import Schedule
from . import forward
from .buckets import bucket, pow2
from .sampling import sample_rows


PROMPT_STEP = 32
FINE_PROMPTS_UP_TO = 512


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Static shape of the pool: ``slots`` rows, each with ``image_len`` visual and ``text_len``
    text positions (the prompt's text plus every generated token), under ``schedule``."""

    slots: int
    image_len: int
    text_len: int
    schedule: Schedule
    max_images: int = 0  # images one request may carry (image_len = max_images x tokens per image)

    def cache(self, batch: int | None = None) -> CacheLayout:
        return CacheLayout(batch=self.slots if batch is None else batch, image_len=self.image_len,
                           text_len=self.text_len, schedule=self.schedule)

    @property
    def max_len(self) -> int:
        """Tokens one sequence may hold in all (its visual and text segments)."""
        return self.image_len + self.text_len


def slot_bytes(cfg, schedule: Schedule, image_len: int, text_len: int, dtype) -> tuple[int, int]:
    """(KV bytes of one slot under ``schedule``, the same slot's dense bytes), from the array
    shapes :func:`~qcache_jax.lazy.cache.init_state` allocates."""
    return layout_kv_bytes(CacheLayout(1, image_len, text_len, schedule), cfg.text, dtype)


def slots_for_budget(budget: int, cfg, schedule: Schedule, image_len: int, text_len: int, dtype,
                     multiple: int = 1) -> int:
    """How many slots of this shape ``budget`` bytes of KV cache hold (rounded down to a
    ``multiple``: the mesh's data axis). QCacheError when not even one fits."""
    per, _ = slot_bytes(cfg, schedule, image_len, text_len, dtype)
    n = (int(budget) // per) // multiple * multiple
    if n < 1:
        raise QCacheError(
            f"a KV budget of {budget / 2**20:.1f} MiB holds no slot: one sequence of {image_len + text_len} tokens "
            f"({schedule.label} schedule) needs {per / 2**20:.1f} MiB" + (f" (x{multiple} for the mesh's data axis)"
                                                                          if multiple > 1 else "")
            + "; raise --kv-budget or lower --max-model-len"
        )
    return n


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotPool:
    """Everything the pool keeps per slot on the device: the decoding state, the token fed
    next, whether the slot is active, and its request's sampling key and settings."""

    state: DecodingState
    token: jax.Array  # [S] int32: the last emitted token, fed at the next step
    active: jax.Array  # [S] bool
    key: jax.Array  # [S, 2] uint32: each request's own PRNG key
    temperature: jax.Array  # [S] float32 (<= 0: greedy)
    top_k: jax.Array  # [S] int32 (0: off)
    top_p: jax.Array  # [S] float32 (1: off)


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One request's sampling settings (host values)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def _prefill(graphdef, layout: CacheLayout, attn: LazyAttention, loop: str, params, input_ids, prompt_len,
             pixel_values, key, temperature, top_k, top_p) -> SlotPool:
    """A one-row pool entry: the prompt's caches and its first token, sampled."""
    model = nnx.merge(graphdef, params)
    state, logits = forward.prefill(model, layout.schedule, attn, layout, input_ids, prompt_len, pixel_values,
                                    loop=loop)
    key, sub = jax.random.split(key)
    settings = (temperature[None], top_k[None], top_p[None])
    tok = sample_rows(logits, sub[None], *settings)
    return SlotPool(state, tok, jnp.ones((1,), bool), key[None], *settings)


def _step(graphdef, schedule: Schedule, attn: LazyAttention, loop: str, params, pool: SlotPool) -> SlotPool:
    """One decode token for every slot. Inactive slots compute too (the batch is static) but
    their counters stay put, and their token is unchanged."""
    model = nnx.merge(graphdef, params)
    state, logits = forward.decode_step(model, schedule, attn, pool.state, pool.token, loop=loop)
    a = pool.active
    state = dataclasses.replace(state, n_txt=jnp.where(a, state.n_txt, pool.state.n_txt),
                                positions=jnp.where(a, state.positions, pool.state.positions))
    split = jax.vmap(jax.random.split)(pool.key)
    tok = sample_rows(logits, split[:, 1], pool.temperature, pool.top_k, pool.top_p)
    return dataclasses.replace(pool, state=state, token=jnp.where(a, tok, pool.token), key=split[:, 0])


def _insert(pool: SlotPool, new: SlotPool, slot) -> SlotPool:
    """``new`` (one row) written into row ``slot`` of every pool array, in place."""
    return jax.tree.map(lambda p, x: jax.lax.dynamic_update_slice_in_dim(p, x.astype(p.dtype), slot, 0), pool, new)


def _release(pool: SlotPool, slot) -> SlotPool:
    return dataclasses.replace(pool, active=pool.active.at[slot].set(False))


class SlotEngine:
    """The pool of ``layout.slots`` sequences and its executables for one model.

    Not thread-safe: one thread (the scheduler's) calls it. ``log``: called before anything
    slow (a compilation).
    """

    def __init__(self, graphdef, params, cfg, layout: SlotLayout, *, attn: LazyAttention, pad_id: int = 0,
                 loop: str = "unroll", mesh=None, log: Callable[[str], None] | None = None):
        if cfg.anyres or cfg.family != "llava":
            raise QCacheError("serving LLaVA-NeXT and Qwen2-VL checkpoints is not supported yet (their image-token "
                              "count depends on each image's size); serve a LLaVA-1.5-style or text-only checkpoint")
        if layout.slots < 1 or layout.text_len < 2:
            raise QCacheError(f"a slot pool needs >= 1 slot and >= 2 text positions, got {layout}")
        self.graphdef, self.params, self.cfg, self.layout = graphdef, params, cfg, layout
        self.attn, self.pad_id, self.loop, self.mesh, self.log = attn, pad_id, loop, mesh, log
        self.dtype = jax.tree.leaves(params)[0].dtype
        self.compiles = 0  # executables compiled so far (the no-recompilation test counts these)
        self._exe: dict = {}
        # On a mesh every executable's outputs keep fixed shardings, so that the next one (compiled
        # for exactly those) takes them as they are.
        self._shardings = self._pool_shardings() if mesh is not None else None
        self._row_shardings = self._pool_shardings(1) if mesh is not None else None
        self.pool = self._empty_pool()

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def slot_kv_bytes(self) -> int:
        return slot_bytes(self.cfg, self.layout.schedule, self.layout.image_len, self.layout.text_len, self.dtype)[0]

    @property
    def pool_kv_bytes(self) -> int:
        """Bytes of the pool's KV arrays (every slot, allocated up front)."""
        return layout_kv_bytes(self.layout.cache(), self.cfg.text, self.dtype)[0]

    def prompt_bucket(self, n_tokens: int) -> int:
        """The padded prompt length a prefill of ``n_tokens`` compiles for: a multiple of
        :data:`PROMPT_STEP` up to :data:`FINE_PROMPTS_UP_TO` tokens, then ``generate``'s buckets.
        A server prefills every request on its own, so padding costs it directly; finer buckets
        than ``generate``'s powers of two cost a few more compilations (once each, ``--warmup``)."""
        n = max(int(n_tokens), 1)
        b = -(-n // PROMPT_STEP) * PROMPT_STEP if n <= FINE_PROMPTS_UP_TO else bucket(n)
        return min(b, max(self.layout.max_len, n))

    def check_fits(self, n_prompt: int, n_image_tokens: int, max_tokens: int) -> None:
        """QCacheError with the numbers when a prompt of ``n_prompt`` tokens (``n_image_tokens``
        of them visual) plus ``max_tokens`` new tokens does not fit one slot."""
        lay = self.layout
        n_text = n_prompt - n_image_tokens
        if n_image_tokens > lay.image_len:
            raise QCacheError(f"the prompt has {n_image_tokens} image tokens; a slot holds {lay.image_len} "
                              f"({lay.max_images} image(s))")
        if n_text + max_tokens > lay.text_len:
            room = lay.text_len - n_text
            raise QCacheError(
                f"prompt of {n_prompt} tokens ({n_text} text, {n_image_tokens} image) plus max_tokens {max_tokens} "
                f"does not fit a slot of {lay.max_len} tokens ({lay.text_len} text positions"
                + (f"; at most {room} new tokens fit)" if room > 0 else ")")
            )

    # -- executables ------------------------------------------------------------------------------

    def _pool_shardings(self, rows: int | None = None):
        """The NamedShardings of a pool of ``rows`` (default: every slot) on the mesh: caches
        as generate's decoding state (rows on ``data``, KV heads on ``model``)."""
        from . import mesh as m

        rows = self.layout.slots if rows is None else rows
        state = jax.eval_shape(functools.partial(init_state, self.layout.cache(rows), self.cfg.text, self.dtype))
        vec = m.named(m.rows_spec(rows, self.mesh), self.mesh)
        key = m.named(m.rows_spec(rows, self.mesh, 2), self.mesh)
        return SlotPool(m.named(m.state_specs(state, self.mesh), self.mesh), vec, vec, key, vec, vec, vec)

    def _empty_pool(self) -> SlotPool:
        s = self.layout.slots

        def make():
            return SlotPool(init_state(self.layout.cache(), self.cfg.text, self.dtype), jnp.full((s,), self.pad_id,
                            jnp.int32), jnp.zeros((s,), bool), jnp.zeros((s, 2), jnp.uint32), jnp.zeros((s,)),
                            jnp.zeros((s,), jnp.int32), jnp.ones((s,)))

        return jax.jit(make, out_shardings=self._shardings)()

    def _compile(self, key, fn, *args, donate=(), out=None):
        """The executable ``key`` (compiled on first use); ``out``: its output shardings on a mesh."""
        if key not in self._exe:
            if self.log:
                what = f"prefill for prompts of {key[1]} tokens with {key[2]} image(s)" if key[0] == "prefill" else key[0]
                self.log(f"compiling {what} (first use of this shape)...")
            kw = {} if self.mesh is None or out is None else {"out_shardings": out}
            self._exe[key] = jax.jit(fn, donate_argnums=donate, **kw).lower(*args).compile()
            self.compiles += 1
        return self._exe[key]

    def _step_exe(self):
        fn = functools.partial(_step, self.graphdef, self.layout.schedule, self.attn, self.loop)
        return self._compile(("step",), fn, self.params, self.pool, donate=(1,), out=self._shardings)

    def _insert_exe(self, new):
        return self._compile(("insert",), _insert, self.pool, new, jnp.int32(0), donate=(0,), out=self._shardings)

    def _release_exe(self):
        return self._compile(("release",), _release, self.pool, jnp.int32(0), donate=(0,), out=self._shardings)

    def _prefill_exe(self, t: int, n_images: int):
        v = self.cfg.vision
        pv = None if not n_images else jax.ShapeDtypeStruct((n_images, v.num_channels, v.image_size, v.image_size),
                                                            jnp.float32)
        f32, i32 = jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
        args = (self.params, jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32), pv,
                jax.ShapeDtypeStruct((2,), jnp.uint32), f32, i32, f32)
        fn = functools.partial(_prefill, self.graphdef, self.layout.cache(1), self.attn, self.loop)
        return self._compile(("prefill", t, n_images), fn, *args, out=self._row_shardings)

    def warmup(self, prompt_lengths=(), image_counts=(0,)) -> float:
        """Compile step, insert, release, and the prefill of each prompt length's bucket for each
        image count, now rather than at the first request; returns the seconds spent."""
        t0 = time.perf_counter()
        self._step_exe()
        self._release_exe()
        for n in sorted({self.prompt_bucket(n) for n in prompt_lengths}):
            for k in image_counts:
                self._prefill_exe(n, pow2(k) if k else 0)
        new = jax.eval_shape(lambda p: jax.tree.map(lambda x: x[:1], p), self.pool)
        if self.mesh is not None:
            new = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), new, self._row_shardings)
        self._insert_exe(new)
        return time.perf_counter() - t0

    # -- the API ------------------------------------------------------------------------------------

    def prefill(self, prompt: list[int], pixel_values: np.ndarray | None, sampling: RowSampling) -> SlotPool:
        """Run one prompt (image tokens expanded; ``pixel_values`` [N, C, H, W] for its N
        images) into a one-row :class:`SlotPool` holding its caches and first token."""
        n = len(prompt)
        t = self.prompt_bucket(n)
        ids = np.full((1, t), self.pad_id, np.int32)
        ids[0, :n] = prompt
        pv = None
        if pixel_values is not None and len(pixel_values):
            k = pow2(len(pixel_values))
            pv = np.zeros((k, *pixel_values.shape[1:]), np.float32)
            pv[: len(pixel_values)] = pixel_values
        exe = self._prefill_exe(t, 0 if pv is None else pv.shape[0])
        key = jax.random.PRNGKey(int(sampling.seed) % 2**32)
        return exe(self.params, jnp.asarray(ids), jnp.asarray([n], jnp.int32), None if pv is None else jnp.asarray(pv),
                   key, jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))

    def insert(self, slot: int, new: SlotPool) -> int:
        """Put a prefilled request into ``slot``; returns its first token (read on the host)."""
        self.pool = self._insert_exe(new)(self.pool, new, jnp.int32(slot))
        return int(np.asarray(new.token)[0])

    def step(self) -> np.ndarray:
        """Advance every active slot by one token; returns the pool's tokens [S] (an inactive
        slot's entry is meaningless)."""
        self.pool = self._step_exe()(self.params, self.pool)
        return np.asarray(self.pool.token)

    def release(self, slot: int) -> None:
        """Free ``slot`` (its arrays are overwritten by the next insert)."""
        self.pool = self._release_exe()(self.pool, jnp.int32(slot))

    def reset(self) -> None:
        """A fresh, empty pool (after a failed step, whose donated pool may be gone)."""
        self.pool = None  # the old pool's buffers go before the new ones are allocated
        self.pool = self._empty_pool()

    def active(self) -> np.ndarray:
        return np.asarray(self.pool.active)
