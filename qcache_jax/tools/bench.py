"""Benchmark library: realistic-shape models with random weights, and timed generate runs.

Nothing here downloads anything. A benchmark model is a :class:`~qcache_jax.api.QCacheModel`
built from a :class:`~qcache_jax.config.LlavaConfig` preset with random parameters:

* ``llava-1.5-7b``: LLaVA-1.5-7B dimensions (Vicuna-7B decoder, CLIP ViT-L/14-336 tower,
  576 image tokens per image), optionally with fewer decoder layers (for a GPU run);
* ``cpu-300m``: a ~290M-parameter stand-in with the same structure (full 32k vocabulary,
  16 decoder layers of width 1024, a small CLIP tower with 336 px images -> 576 tokens), sized
  so that a 2-core CPU finishes a sweep in minutes;
* ``tiny``: a few-layer toy for smoke tests.

:func:`measure` times ``QCacheModel.generate`` the way a user calls it: one warm-up call
(compile time recorded separately), then medians over ``repeats`` steady-state calls of the
prefill seconds and decode tokens/s the engine reports. KV bytes come from the arrays that
exist; :func:`max_batch` sizes the largest batch under a memory budget from the cache array
shapes (``jax.eval_shape``, nothing allocated).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..config import LlavaConfig, RopeConfig, TextConfig, VisionConfig
from ..errors import QCacheError

# Vicuna-7B / LLaVA-1.5-7B: token ids as in llava-hf/llava-1.5-7b-hf.
_LLAVA_VOCAB = 32064
_LLAVA_IMAGE_TOKEN = 32000


def _text(**kw) -> TextConfig:
    base = dict(
        vocab_size=_LLAVA_VOCAB, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    )
    base.update(kw)
    return TextConfig(**base)


def preset_config(name: str, *, num_layers: int | None = None, dtype: str = "float32") -> LlavaConfig:
    """The :class:`LlavaConfig` of a benchmark preset (``num_layers`` overrides the decoder depth)."""
    if name == "llava-1.5-7b":
        text = _text(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
        vision = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336, patch_size=14)
        image_token = _LLAVA_IMAGE_TOKEN
    elif name == "cpu-300m":
        text = _text(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=64)
        vision = VisionConfig(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, image_size=336, patch_size=14)
        image_token = _LLAVA_IMAGE_TOKEN
    elif name == "tiny":
        text = _text(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=2048, eos_token_id=(2,))
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28, patch_size=7)
        image_token = 255
    else:
        raise QCacheError(f"unknown benchmark preset {name!r}; expected one of {', '.join(PRESETS)}")
    if num_layers is not None:
        if num_layers < 1:
            raise QCacheError(f"num_layers must be >= 1, got {num_layers}")
        text = dataclasses.replace(text, num_layers=num_layers)
    return LlavaConfig(
        vision=vision, text=text, image_token_id=image_token, image_seq_length=vision.num_patches,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default", dtype=dtype,
    )


PRESETS = ("llava-1.5-7b", "cpu-300m", "tiny")


def count_params(tree) -> tuple[int, int]:
    """(number of parameters, bytes) of a parameter pytree (or of ShapeDtypeStructs)."""
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) for x in leaves), sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def random_model(cfg: LlavaConfig, seed: int = 0):
    """A :class:`QCacheModel` with random parameters (normal, std 0.02; norms 1) for ``cfg``."""
    from flax import nnx

    from ..api import QCacheModel
    from ..nn.llava import Llava

    @jax.jit
    def build(key):
        return nnx.to_pure_dict(nnx.state(Llava(cfg, rngs=nnx.Rngs(params=key))))

    return QCacheModel(cfg, build(jax.random.PRNGKey(seed)))


def lazy_schedule(num_layers: int, fraction: float) -> tuple[bool, ...]:
    """round(fraction * L) lazy layers (at most L - 1), spread evenly over layers 1..L-1.

    A stand-in for a calibrated schedule (random weights have no meaningful attention to
    calibrate on); the speed of a schedule depends only on how many layers are lazy.
    """
    if not 0 <= fraction < 1:
        raise QCacheError(f"lazy fraction must be in [0, 1), got {fraction}")
    n = min(int(round(fraction * num_layers)), num_layers - 1)
    if n == 0:
        return (False,) * num_layers
    # The n layers of 1..L-1 closest to an even spread; layer 0 stays the first anchor.
    picks = sorted({1 + int(round(i * (num_layers - 2) / max(n - 1, 1))) for i in range(n)} if n > 1 else {num_layers // 2})
    k = 1
    while len(picks) < n:  # rounding collisions: fill the gaps from the bottom
        if k not in picks:
            picks.append(k)
        k += 1
    chosen = set(picks[:n])
    return tuple(i in chosen for i in range(num_layers))


def make_inputs(cfg: LlavaConfig, *, batch: int, prompt_tokens: int, image_tokens: int, seed: int = 0):
    """HF-style ``(input_ids [B, T], pixel_values [N, C, H, W] or None)`` for a benchmark.

    Each row: BOS, its ``image_tokens`` image tokens (a whole number of images), then
    ``prompt_tokens`` random text tokens (T = 1 + image_tokens + prompt_tokens).
    """
    per = cfg.image_tokens_per_image
    if image_tokens < 0 or image_tokens % per:
        raise QCacheError(f"--image-tokens must be a multiple of {per} (the tokens of one image), got {image_tokens}")
    if prompt_tokens < 0 or batch < 1:
        raise QCacheError(f"need --batch >= 1 and --prompt-tokens >= 0, got {batch} and {prompt_tokens}")
    rng = np.random.default_rng(seed)
    v = cfg.text.vocab_size
    specials = {cfg.image_token_id, *(cfg.text.eos_token_id or ()), cfg.text.bos_token_id, cfg.text.pad_token_id}
    text = rng.integers(3, min(v, 32000), (batch, prompt_tokens))
    text = np.where(np.isin(text, list(s for s in specials if s is not None)), 3, text)
    bos = np.full((batch, 1), cfg.text.bos_token_id if cfg.text.bos_token_id is not None else 1)
    img = np.full((batch, image_tokens), cfg.image_token_id)
    ids = np.concatenate([bos, img, text], axis=1).astype(np.int32)
    n_img = batch * image_tokens // per
    vc = cfg.vision
    pv = rng.standard_normal((n_img, vc.num_channels, vc.image_size, vc.image_size)).astype(np.float32) if n_img else None
    return ids, pv


def environment() -> dict:
    """jax version, backend and device: recorded with every table."""
    dev = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": f"{dev.device_kind} x{jax.device_count()}",
        "host": f"{platform.machine()}, {_cpu_count()} cores",
    }


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def measure(model, *, lazy=None, mode: str = "gla", **kw) -> dict:
    """:func:`measure_many` for one configuration."""
    return measure_many(model, {"run": (lazy, mode)}, **kw)["run"]


def measure_many(
    model,
    configs: dict,
    *,
    batch: int = 1,
    prompt_tokens: int = 32,
    image_tokens: int = 576,
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
    attention_impl: str = "auto",
) -> dict:
    """Time ``model.generate`` (greedy, EOS disabled) for each of ``configs`` (name ->
    ``(lazy, mode)``) on the same inputs.

    Each configuration gets one warm-up call that compiles its bucket (``compile_seconds``;
    ``first_call_seconds`` is the whole first call), then ``repeats`` rounds run every
    configuration in turn (so machine noise hits all alike); times are medians. ``speedup``
    is the median per-round ratio of decode tokens/s to the first configuration's. Returns
    name -> flat JSON-ready dict.
    """
    if repeats < 1 or new_tokens < 2:
        raise QCacheError(f"need repeats >= 1 and --new-tokens >= 2 (got {repeats}, {new_tokens})")
    ids, pv = make_inputs(model.config, batch=batch, prompt_tokens=prompt_tokens, image_tokens=image_tokens, seed=seed)
    per = model.config.image_tokens_per_image
    kw, info = {}, {}
    for name, (lazy, mode) in configs.items():
        schedule = model.resolve_lazy(lazy)
        kw[name] = dict(input_ids=ids, pixel_values=pv, lazy=schedule, mode=mode, max_new_tokens=new_tokens, eos_token_id=-1,
                        attention_impl=attention_impl)
        t0 = time.perf_counter()
        first = model.generate(**kw[name])
        layout = model.engine(attention_impl).plan(
            first.prompt_token_ids, [image_tokens // per] * batch, schedule=schedule, mode=mode,
            max_new_tokens=new_tokens, eos=(-1,), pad_id=model._pad_id(),
        ).layout
        info[name] = dict(schedule=schedule, first=first, first_call=time.perf_counter() - t0, layout=layout, runs=[])
    for _ in range(repeats):
        for name in configs:
            t0 = time.perf_counter()
            r = model.generate(**kw[name])
            wall = time.perf_counter() - t0
            if r.compile_seconds:  # pragma: no cover - would mean the bucket was evicted
                raise RuntimeError("generate recompiled during the timed repeats")
            info[name]["runs"].append((r, wall))
    base = next(iter(configs))
    out = {}
    for name, d in info.items():
        runs, schedule, layout = d["runs"], d["schedule"], d["layout"]
        r = runs[-1][0]
        n_lazy = sum(schedule)
        tok_s = _median([x.decode_tokens_per_second for x, _ in runs])
        out[name] = {
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens,
            "new_tokens": new_tokens,
            "mode": "dense" if n_lazy == 0 else configs[name][1],
            "lazy_layers": [i for i, f in enumerate(schedule) if f],
            "n_lazy": n_lazy,
            "num_layers": len(schedule),
            "lazy_fraction": n_lazy / len(schedule),
            "cache_rows": layout.batch,
            "cache_image_len": layout.image_len,
            "cache_text_len": layout.text_len,
            "kv_cache_bytes": r.kv_cache_bytes,
            "dense_kv_cache_bytes": r.dense_kv_cache_bytes,
            "kv_saved_fraction": r.kv_saved_fraction,
            "compile_seconds": d["first"].compile_seconds,
            "first_call_seconds": d["first_call"],
            "prefill_seconds": _median([x.prefill_seconds for x, _ in runs]),
            "decode_tokens_per_second": tok_s,
            "decode_ms_per_step": 1e3 * batch / tok_s if tok_s else float("nan"),
            "generate_seconds": _median([w for _, w in runs]),
            "speedup": _median([x.decode_tokens_per_second / y.decode_tokens_per_second
                                for (x, _), (y, _) in zip(runs, info[base]["runs"])]),
            "repeats": repeats,
            "tokens_generated": [len(t) for t in r.token_ids],
            "token_ids": r.token_ids,
            **environment(),
        }
    return out


# -- memory budget -----------------------------------------------------------------------------


def kv_bytes_per_row(cfg: LlavaConfig, *, image_tokens: int, text_tokens: int, lazy, mode: str, dtype=None) -> tuple[int, int]:
    """(KV bytes, dense KV bytes) of one cache row, from the real cache array shapes
    (``init_state`` under ``jax.eval_shape``; nothing is allocated)."""
    from ..lazy.cache import CacheLayout, init_state

    dtype = jnp.dtype(dtype or cfg.dtype)
    layout = CacheLayout(batch=1, image_len=image_tokens, text_len=text_tokens, schedule=tuple(lazy), mode=mode)
    shapes = jax.eval_shape(lambda: init_state(layout, cfg.text, dtype))
    n = sum(int(np.prod(x.shape)) * x.dtype.itemsize for layer in shapes.layers for x in jax.tree.leaves(layer))
    dense = 2 * cfg.text.num_layers * (image_tokens + text_tokens) * cfg.text.num_kv_heads * cfg.text.head_dim * dtype.itemsize
    return n, dense


def max_batch(cfg: LlavaConfig, budget_bytes: int, *, image_tokens: int, text_tokens: int, lazy, mode: str, dtype=None) -> dict:
    """Largest batch whose weights + KV cache fit ``budget_bytes``.

    ``rows``: cache rows that fit (weights + rows * KV per row <= budget); ``engine_batch``: the
    largest power of two <= rows (the engine allocates the cache for a power-of-two batch
    bucket). Activations/workspace are not counted (small next to the cache at decode).
    """
    from ..nn.llava import abstract_model as abstract_params

    dtype = jnp.dtype(dtype or cfg.dtype)
    _, abstract = abstract_params(cfg)
    n_params, _ = count_params(abstract)
    weights = n_params * dtype.itemsize
    per_row, dense_row = kv_bytes_per_row(cfg, image_tokens=image_tokens, text_tokens=text_tokens, lazy=lazy, mode=mode, dtype=dtype)
    rows = max(0, (budget_bytes - weights) // per_row)
    return {
        "budget_bytes": int(budget_bytes),
        "weights_bytes": int(weights),
        "kv_bytes_per_row": int(per_row),
        "dense_kv_bytes_per_row": int(dense_row),
        "rows": int(rows),
        "engine_batch": int(1 << (int(rows).bit_length() - 1)) if rows else 0,
    }


# -- Hugging Face comparison -------------------------------------------------------------------


def hf_model_for(cfg: LlavaConfig, seed: int = 0):
    """A random ``transformers`` ``LlavaForConditionalGeneration`` with ``cfg``'s dimensions
    (float32, eval, sdpa attention)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration

    t, v = cfg.text, cfg.vision
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, rope_theta=t.rope.theta, bos_token_id=t.bos_token_id,
        eos_token_id=list(t.eos_token_id)[0] if t.eos_token_id else None, pad_token_id=t.pad_token_id, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, projection_dim=v.hidden_size,
    )
    hf_cfg = HFLlavaConfig(
        vision_config=vision, text_config=text, image_token_index=cfg.image_token_id, image_seq_length=cfg.image_tokens_per_image,
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
    )
    hf_cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(hf_cfg).eval()
    return model


def hf_generate_times(hf_model, input_ids, pixel_values, *, new_tokens: int, repeats: int = 3) -> dict:
    """HF ``generate`` (greedy, EOS never stops it): medians of the time to the first token
    (``max_new_tokens=1``: prefill) and of the whole call with ``new_tokens``.
    Decode tokens/s = batch * (new_tokens - 1) / (whole - first)."""
    import torch

    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    if pixel_values is not None:
        kw["pixel_values"] = torch.tensor(np.asarray(pixel_values))

    def run(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t0, out

    run(2)  # warm-up
    first = _median([run(1)[0] for _ in range(repeats)])
    whole, tokens = [], None
    for _ in range(repeats):
        s, out = run(new_tokens)
        whole.append(s)
        tokens = out[:, ids.shape[1]:].tolist()
    whole_s = _median(whole)
    b = ids.shape[0]
    return {
        "prefill_seconds": first,
        "generate_seconds": whole_s,
        "decode_tokens_per_second": b * (new_tokens - 1) / max(whole_s - first, 1e-9),
        "token_ids": tokens,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# -- decode-only timing on the engine's compiled executables ------------------------------------


class DecodeBench:
    """Decode throughput of one configuration at batch ``batch``, without re-running prefill.

    Uses the engine's own compiled prefill/decode (``Engine._executables``, the ones
    ``generate`` runs). The prompt is the same in every row, so the decoding state after a
    batch-1 prefill, repeated ``batch`` times, is exactly the state a batch-``batch`` prefill
    would produce; each :meth:`run` feeds a fresh copy of it to the compiled ``lax.while_loop``
    decode (the state is donated) and returns tokens/s. This keeps a long-prompt, large-batch
    decode measurement affordable on a CPU (the prefill of batch x 2.9k tokens would dominate).
    """

    def __init__(self, model, *, batch: int, prompt_tokens: int, image_tokens: int, new_tokens: int, lazy=None,
                 mode: str = "gla", seed: int = 0, attention_impl: str = "auto", share: "DecodeBench | None" = None,
                 prefill_repeats: int = 1, state: str = "prefill"):
        """``share``: a bench of the same model, inputs and schedule at another batch whose
        batch-1 prefill state is reused. ``prefill_repeats``: timed batch-1 prefills (median).
        ``state="synthetic"`` skips the prefill (its compile and its run): the decode starts from
        a state of exactly the post-prefill shapes and lengths filled with random keys/values
        (decode cost does not depend on the cache contents), and only the engine's decode
        executable is compiled (``jax.jit`` of the engine's ``_decode_loop`` for the same plan)."""
        if state not in ("prefill", "synthetic"):
            raise ValueError(f"state must be 'prefill' or 'synthetic', got {state!r}")
        self.state_kind = state
        from ..lazy.cache import dense_kv_cache_bytes, init_state, kv_cache_bytes

        self.model, self.batch, self.new_tokens = model, batch, new_tokens
        self.schedule = model.resolve_lazy(lazy)
        self.mode = mode if any(self.schedule) else "dense"
        ids, pv = make_inputs(model.config, batch=1, prompt_tokens=prompt_tokens, image_tokens=image_tokens, seed=seed)
        engine = model.engine(attention_impl)
        prompts = [ids[0].tolist()]
        n_img = [image_tokens // model.config.image_tokens_per_image]
        plan_kw = dict(schedule=self.schedule, mode=mode, max_new_tokens=new_tokens, eos=(-1,), pad_id=model._pad_id())
        plan1 = engine.plan(prompts, n_img, **plan_kw)
        plan = engine.plan(prompts * batch, n_img * batch, **plan_kw)
        assert plan.layout.image_len == plan1.layout.image_len and plan.layout.text_len == plan1.layout.text_len
        self.layout = plan.layout
        b = plan.layout.batch  # the batch bucket (a power of two >= batch)

        def scalars(rows, active):
            return (jax.random.PRNGKey(0), jnp.int32(new_tokens), jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0),
                    jnp.asarray(np.arange(rows) < active))

        def prefill_args(p):
            rows = p.layout.batch
            st = jax.eval_shape(lambda: init_state(p.layout, model.config.text, engine.dtype))
            pv_ = None if not p.n_images else jax.ShapeDtypeStruct((p.n_images, *pv.shape[1:]), jnp.float32)
            return (model.params, st, jax.ShapeDtypeStruct((rows, p.prompt_len), jnp.int32),
                    jax.ShapeDtypeStruct((rows,), jnp.int32), pv_)

        self.scalars = scalars(b, batch)
        self.plan1 = plan1
        if state == "synthetic":
            self._synthetic(engine, plan, prompts[0], image_tokens)
            return
        prefill1, _, c1 = engine._executables(plan1, prefill_args(plan1), scalars(plan1.layout.batch, 1))
        _, self.decode, cb = engine._executables(plan, prefill_args(plan), self.scalars)
        self.compile_seconds = c1 + cb
        # The batch-1 prefill, exactly as Engine.generate feeds it (padded ids, lengths, images).
        ids1 = np.full((1, plan1.prompt_len), plan1.pad_id, np.int32)
        ids1[0, : len(prompts[0])] = prompts[0]
        pv1 = None
        if plan1.n_images:
            pv1 = np.zeros((plan1.n_images, *pv.shape[1:]), np.float32)
            pv1[: len(pv)] = pv
            pv1 = jnp.asarray(pv1)
        if share is not None and share.plan1 == plan1:
            self.state1, self.logits1, self.prefill_seconds_b1 = share.state1, share.logits1, share.prefill_seconds_b1
        else:
            times = []
            for _ in range(max(1, prefill_repeats)):
                state0 = jax.jit(init_state, static_argnums=(0, 1, 2))(plan1.layout, model.config.text, engine.dtype)
                jax.block_until_ready(state0)
                t0 = time.perf_counter()
                self.state1, self.logits1 = prefill1(
                    model.params, state0, jnp.asarray(ids1), jnp.asarray([len(prompts[0])], np.int32), pv1
                )
                jax.block_until_ready(self.logits1)
                times.append(time.perf_counter() - t0)
            self.prefill_seconds_b1 = _median(times)
        self.kv_cache_bytes = kv_cache_bytes(self.state1) * b
        self.dense_kv_cache_bytes = dense_kv_cache_bytes(plan.layout, model.config.text, engine.dtype)
        self.times: list[float] = []
        self.tokens = None

    def _synthetic(self, engine, plan, prompt, image_tokens):
        import functools

        from ..runtime import engine as engine_mod
        from ..lazy.cache import dense_kv_cache_bytes, init_state, kv_cache_bytes

        model, b = self.model, plan.layout.batch
        n_img, n_txt = image_tokens, len(prompt) - image_tokens

        @jax.jit
        def make(key):
            st = init_state(plan1_layout, model.config.text, engine.dtype)
            leaves, tree = jax.tree.flatten(st.layers)
            keys = jax.random.split(key, 3)
            # One random slab per segment shape, shared by every layer (cheap to draw).
            slabs = {x.shape: jax.random.normal(keys[i % 2], x.shape, x.dtype) for i, x in enumerate(leaves)}
            st.layers = jax.tree.unflatten(tree, [slabs[x.shape] + 0 for x in leaves])
            st.n_img = jnp.full_like(st.n_img, n_img)
            st.n_txt = jnp.full_like(st.n_txt, n_txt)
            st.positions = jnp.full_like(st.positions, len(prompt))
            return st, jax.random.normal(keys[-1], (1, model.config.text.vocab_size), jnp.float32)

        plan1_layout = self.plan1.layout
        self.state1, self.logits1 = make(jax.random.PRNGKey(1))
        t0 = time.perf_counter()
        fn = jax.jit(functools.partial(engine_mod._decode_loop, engine.graphdef, plan), donate_argnums=(1,))
        st_shape, lg_shape = jax.eval_shape(self._tiled)
        self.decode = fn.lower(model.params, st_shape, lg_shape, *self.scalars).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.prefill_seconds_b1 = float("nan")
        self.kv_cache_bytes = kv_cache_bytes(self.state1) * b
        self.dense_kv_cache_bytes = dense_kv_cache_bytes(plan.layout, model.config.text, engine.dtype)
        self.times = []
        self.tokens = None

    def _tiled(self):
        b = self.layout.batch
        return jax.tree.map(lambda x: jnp.repeat(x, b, axis=0), (self.state1, self.logits1))

    def run(self) -> float:
        """One timed decode of ``new_tokens`` tokens per row; returns tokens/s (also kept)."""
        state, logits = self._tiled()
        jax.block_until_ready((state, logits))
        t0 = time.perf_counter()
        _, tokens, counts, _ = self.decode(self.model.params, state, logits, *self.scalars)
        tokens = np.asarray(tokens)
        dt = time.perf_counter() - t0
        counts = np.asarray(counts)[: self.batch]
        self.tokens = [tokens[i, : counts[i]].tolist() for i in range(self.batch)]
        n = int(sum(max(c - 1, 0) for c in counts))  # as Engine.generate counts: the first token is prefill's
        self.times.append(dt)
        return n / dt

    def summary(self) -> dict:
        n = self.batch * (self.new_tokens - 1)
        tps = [n / t for t in self.times]
        return {
            "batch": self.batch,
            "mode": self.mode,
            "n_lazy": sum(self.schedule),
            "num_layers": len(self.schedule),
            "lazy_layers": [i for i, f in enumerate(self.schedule) if f],
            "cache_rows": self.layout.batch,
            "cache_image_len": self.layout.image_len,
            "cache_text_len": self.layout.text_len,
            "kv_cache_bytes": self.kv_cache_bytes,
            "dense_kv_cache_bytes": self.dense_kv_cache_bytes,
            "kv_saved_fraction": 1 - self.kv_cache_bytes / self.dense_kv_cache_bytes,
            "compile_seconds": self.compile_seconds,
            "decode_tokens_per_second": _median(tps),
            "decode_ms_per_step": 1e3 * _median(self.times) / (self.new_tokens - 1),
            "decode_runs": len(self.times),
            "decode_state": self.state_kind,
            "prefill_seconds_batch1": self.prefill_seconds_b1,
        }


def compare_decode(benches: dict, rounds: int = 5, baseline: str | None = None, warmup: bool = True) -> dict:
    """Round-robin ``rounds`` decode runs over ``benches`` (name -> DecodeBench), so machine
    noise hits every configuration alike. Adds ``speedup``: the median over rounds of the
    per-round tokens/s ratio to ``baseline`` (default: the first entry)."""
    names = list(benches)
    baseline = baseline or names[0]
    for b in benches.values() if warmup else ():  # one untimed run each (first-run allocation effects)
        b.run()
        b.times.clear()
    per_round = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            per_round[n].append(benches[n].run())
    out = {}
    for n in names:
        s = benches[n].summary()
        s["speedup_rounds"] = [a / b for a, b in zip(per_round[n], per_round[baseline])]
        s["speedup"] = _median(s["speedup_rounds"])
        out[n] = s
    return out


def image_capacity(cfg: LlavaConfig, image_tokens: int) -> int:
    """The visual-segment capacity the engine allocates for ``image_tokens`` per row (the image
    count is bucketed to a power of two)."""
    from ..runtime.engine import bucket

    n = image_tokens // cfg.image_tokens_per_image
    return (bucket(n, 1) if n else 0) * cfg.image_tokens_per_image


def bucket_text(prompt_tokens: int, new_tokens: int) -> int:
    """The text-segment capacity the engine allocates for :func:`make_inputs` prompts (BOS +
    ``prompt_tokens``) and ``new_tokens``."""
    from ..runtime.engine import bucket

    return bucket(1 + prompt_tokens) + bucket(new_tokens)
