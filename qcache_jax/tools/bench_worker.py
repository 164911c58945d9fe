"""One benchmark engine in its own process, answering JSON commands on stdin/stdout.

    python -m qcache_jax.tools.bench_worker --engine ours|hf|llama_cpp|none --model M --threads N

The driver (:class:`qcache_jax.tools.bench.Worker`) starts it pinned to N CPUs (set before
Python starts, so XLA sizes its thread pool from them) with ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` = N; torch additionally gets ``torch.set_num_threads(N)`` and llama.cpp
``n_threads = n_threads_batch = N``. The model is loaded once; then every input line is one
command ``{"cmd": ...}`` and every output line one answer ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. Anything else the libraries print goes to stderr.

Commands: ``run`` (one timed generate: batch, prompt_tokens, image_tokens, new_tokens, seed,
lazy_fraction or lazy, mode; the inputs are :func:`qcache_jax.tools.bench.bench_inputs`, for
LLaVA-NeXT one image per row of the size whose anyres token count is image_tokens), ``plan``
(ours: the cache layout and bytes per decode step of a ``run`` without running it),
``max_batch`` (ours: the largest batch whose KV arrays fit a budget), ``bandwidth`` (a jitted
sum over a large array), ``quit``.

Peak memory: before each timed generate the worker writes ``5`` to ``/proc/self/clear_refs``
(resetting the kernel's high-water mark to the current resident size) and after it reads
``VmHWM`` from ``/proc/self/status``: the peak resident memory during that call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the peak resident size to the current one; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Measured:
    """Context: wall time and peak RSS of the block (``seconds``, ``peak_rss_bytes``, ``rss_before_bytes``)."""

    def __enter__(self):
        gc.collect()
        self.rss_before_bytes = _status_bytes("VmRSS")
        self.peak_reset = reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak_rss_bytes = _status_bytes("VmHWM")

    def fields(self) -> dict:
        return {"generate_seconds": self.seconds, "peak_rss_bytes": self.peak_rss_bytes,
                "rss_before_bytes": self.rss_before_bytes, "peak_reset": self.peak_reset}


def _inputs(cfg, req) -> dict:
    """The request's synthetic inputs (:func:`~qcache_jax.tools.bench.bench_inputs`): input_ids,
    pixel_values and, for LLaVA-NeXT, image_sizes."""
    from .bench import bench_inputs

    return bench_inputs(cfg, batch=int(req["batch"]), prompt_tokens=int(req["prompt_tokens"]),
                        image_tokens=int(req.get("image_tokens", 0)), seed=int(req.get("seed", 0)))


def _image_fields(cfg, inputs) -> dict:
    """What the rows' images really are: image tokens per row (counted in input_ids) and, for
    LLaVA-NeXT, the image size and the views (base view + tiles) per image."""
    ids = inputs["input_ids"]
    n = int((ids[0] == cfg.image_token_id).sum()) if cfg.image_token_id is not None else 0
    sizes = inputs.get("image_sizes")
    pv = inputs["pixel_values"]
    return {"prompt_image_tokens": n,
            "image_size": None if sizes is None else [int(x) for x in sizes[0]],
            "image_views": None if sizes is None else int(pv.shape[1])}


class NoEngine:
    """No model: the bandwidth measurement alone."""

    def __init__(self, args):
        self.args = args

    def hello(self) -> dict:
        return {}

    def cmd_bandwidth(self, gib: float = 1.0, repeats: int = 7) -> dict:
        """A jitted ``jnp.sum`` over ``gib`` GiB of float32 (read once per call): seconds per call."""
        import jax
        import jax.numpy as jnp

        n = int(gib * 2**30) // 4
        x = jax.block_until_ready(jnp.ones((n,), jnp.float32) * 1.5)
        f = jax.jit(jnp.sum)
        f(x).block_until_ready()
        times = []
        for _ in range(max(1, int(repeats))):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        del x
        return {"bytes": n * 4, "seconds": times, "threads": len(os.sched_getaffinity(0))}


class OursEngine(NoEngine):
    """``QCacheModel.generate`` on a checkpoint, or on a random preset built here."""

    def __init__(self, args):
        super().__init__(args)
        t0 = time.perf_counter()
        if args.model.startswith("random:"):
            from .bench import parse_random, preset_config, random_model

            preset, layers = parse_random(args.model)
            self.model = random_model(preset_config(preset, num_layers=layers), seed=args.seed)
            if args.mesh:
                from ..api import QCacheModel

                self.model = QCacheModel(self.model.config, self.model.params, mesh=args.mesh)
        else:
            from ..api import load

            self.model = load(args.model, mesh=args.mesh)
        import jax

        jax.block_until_ready(self.model.params)
        self.load_seconds = time.perf_counter() - t0
        self._kernel_counts = {}

    def hello(self) -> dict:
        from .bench import count_params

        n, b = count_params(self.model.params)
        import jax

        return {"load_seconds": self.load_seconds, "n_params": n, "weights_bytes": b,
                "device": str(jax.devices()[0]), "threads": len(os.sched_getaffinity(0))}

    def _schedule(self, req):
        from .bench import lazy_schedule

        mode = req.get("mode") or "gla"
        if req.get("lazy_fraction") is not None:
            return lazy_schedule(self.model.num_layers, float(req["lazy_fraction"]), mode)
        return self.model.resolve_lazy(req.get("lazy"), mode)

    def _plan(self, req, batch=None):
        """(schedule, options, engine, plan) of a ``run`` request (``batch`` overrides its batch)."""
        cfg = self.model.config
        fastv = self.model.resolve_fastv(req.get("fastv_layer"), req.get("fastv_keep", 0.5))
        schedule = self.model.effective_schedule(self._schedule(req), fastv=fastv)  # cut at FastV's layer
        opts = self.model.options(lazy=schedule, mode=schedule.mode, max_new_tokens=int(req["new_tokens"]),
                                  eos_token_id=-1, fastv_layer=req.get("fastv_layer"),
                                  fastv_keep=req.get("fastv_keep", 0.5))
        from .bench import image_size_for

        b = int(batch if batch is not None else req["batch"])
        img = int(req.get("image_tokens", 0))
        image_size_for(cfg, img)  # checks the count (LLaVA-NeXT: that one image of some size gives it)
        per = cfg.image_tokens_per_image
        # The prompts' shapes without their pixels: BOS, the image tokens, the text.
        prompts = [[0] + [cfg.image_token_id] * img + [0] * int(req["prompt_tokens"])] * b
        n_img = (1 if img else 0) if cfg.anyres else (img // per if per else 0)  # NeXT: one image per row
        engine, plan = self.model.plan(prompts, [n_img] * b, opts, schedule)
        return schedule, opts, engine, plan

    def _layout_fields(self, req, plan, engine) -> dict:
        from .bench import step_bytes

        kv, dense = engine.kv_bytes(plan)
        lay = plan.layout
        return {"cache_rows": lay.batch, "cache_image_len": lay.image_len, "cache_text_len": lay.text_len,
                "kv_cache_bytes": kv, "dense_kv_cache_bytes": dense,
                "step_bytes": step_bytes(self.model.config, lay, engine.dtype,
                                         reuse_probs=plan.attn.reuse_probs),
                "dense_step_bytes": step_bytes(self.model.config, lay.dense(), engine.dtype)}

    def cmd_plan(self, **req) -> dict:
        schedule, _, engine, plan = self._plan(req)
        return {"mode": schedule.label, "lazy_layers": schedule.lazy_layers, **self._layout_fields(req, plan, engine)}

    def cmd_max_batch(self, budget_bytes: int, limit: int = 4096, **req) -> dict:
        """The largest batch whose KV arrays (as the engine allocates them: rows rounded up to
        its batch bucket) fit ``budget_bytes``; searched bucket by bucket."""
        from ..runtime.engine import batch_bucket

        best, n = None, 1
        while n <= limit:
            _, _, engine, plan = self._plan(req, batch=n)
            kv, _ = engine.kv_bytes(plan)
            if kv > budget_bytes:
                return {"batch": best, "next_rows": plan.layout.batch, "next_kv_cache_bytes": kv}
            best = plan.layout.batch
            n = batch_bucket(n) + 1
        return {"batch": best, "next_rows": None, "next_kv_cache_bytes": None}

    def cmd_run(self, **req) -> dict:
        cfg = self.model.config
        inputs = _inputs(cfg, req)
        ids = inputs["input_ids"]
        schedule, opts, engine, plan = self._plan(req)
        with Measured() as m:
            res = self.model.generate(**inputs, options=opts)
        decode_tokens = sum(max(len(t) - 1, 0) for t in res.token_ids)
        tok_s = res.decode_tokens_per_second
        return {
            "engine": "ours", "batch": int(req["batch"]), "mode": schedule.label, "lazy_layers": schedule.lazy_layers,
            "prompt_len": int(ids.shape[1]), "new_tokens": int(req["new_tokens"]),
            "prefill_seconds": res.prefill_seconds, "decode_tokens": decode_tokens,
            "decode_seconds": decode_tokens / tok_s if tok_s else None, "decode_tokens_per_second": tok_s,
            "decode_steps": max(len(t) for t in res.token_ids) - 1, "compile_seconds": res.compile_seconds,
            "token_ids": res.token_ids, **_image_fields(cfg, inputs), **m.fields(),
            **self._layout_fields(req, plan, engine), "decode_kernels": self._kernels(engine, plan),
        }

    def _kernels(self, engine, plan) -> dict | None:
        """:func:`~qcache_jax.tools.bench.decode_kernels` of the plan's compiled decode loop
        (None with a mesh, whose loop is compiled differently), read once per plan."""
        from .bench import decode_kernels

        if self.model.mesh is not None:
            return None
        if plan not in self._kernel_counts:
            self._kernel_counts[plan] = decode_kernels(engine.decode_executable(plan).as_text())
        return self._kernel_counts[plan]


class HFEngine(NoEngine):
    """Hugging Face ``generate`` (greedy, sdpa, float32) on an HF model directory."""

    def __init__(self, args):
        super().__init__(args)
        import torch

        torch.set_num_threads(args.threads)
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            LlavaForConditionalGeneration,
            LlavaNextForConditionalGeneration,
        )

        from ..io.hf_config import from_hf_config

        t0 = time.perf_counter()
        hf_cfg = AutoConfig.from_pretrained(args.model)
        self.cfg = from_hf_config(hf_cfg, dtype="float32")
        if self.cfg.family != "llava":  # Qwen2-VL / Qwen2.5-VL
            cls = AutoModelForImageTextToText
        elif self.cfg.anyres:
            cls = LlavaNextForConditionalGeneration
        else:
            cls = LlavaForConditionalGeneration if self.cfg.has_vision else AutoModelForCausalLM
        self.model = cls.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.load_seconds = time.perf_counter() - t0
        self.torch = torch

    def hello(self) -> dict:
        params = list(self.model.parameters())
        return {"load_seconds": self.load_seconds, "n_params": sum(p.numel() for p in params),
                "weights_bytes": sum(p.numel() * p.element_size() for p in params),
                "torch_threads": self.torch.get_num_threads(), "threads": len(os.sched_getaffinity(0)),
                "attn_implementation": self.model.config._attn_implementation}

    def cmd_run(self, **req) -> dict:
        torch = self.torch
        from transformers import LogitsProcessor, LogitsProcessorList

        inputs = _inputs(self.cfg, req)
        ids, pv = inputs["input_ids"], inputs["pixel_values"]
        n = int(req["new_tokens"])

        class Clock(LogitsProcessor):
            """Notes when generate first asks for the next token: the prompt's forward is done."""

            first = None

            def __call__(self, input_ids, scores):
                if self.first is None:
                    self.first = time.perf_counter()
                return scores

        clock = Clock()
        t = torch.from_numpy(ids.astype("int64"))
        kw = dict(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                  logits_processor=LogitsProcessorList([clock]), pad_token_id=self.cfg.text.pad_token_id or 0)
        if pv is not None:
            kw["pixel_values"] = torch.from_numpy(pv)
        if inputs.get("image_sizes") is not None:  # LLaVA-NeXT
            kw["image_sizes"] = torch.from_numpy(inputs["image_sizes"])
        if inputs.get("image_grid_thw") is not None:  # Qwen2-VL: its M-RoPE needs the token types
            kw["image_grid_thw"] = torch.from_numpy(inputs["image_grid_thw"])
            kw["mm_token_type_ids"] = torch.from_numpy((ids == self.cfg.image_token_id).astype("int64"))
        with Measured() as m, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(**kw)
            t1 = time.perf_counter()
        b, T = ids.shape
        tx = self.cfg.text
        new = out[:, T:].tolist()
        decode_tokens = b * (n - 1)
        return {
            "engine": "hf", "batch": b, "mode": "dense", "prompt_len": T, "new_tokens": n,
            "prefill_seconds": clock.first - t0, "decode_seconds": t1 - clock.first, "decode_tokens": decode_tokens,
            "decode_tokens_per_second": decode_tokens / (t1 - clock.first), "compile_seconds": 0.0,
            # transformers' DynamicCache holds K and V for every position it has seen, per layer.
            "kv_cache_bytes": 2 * tx.num_layers * b * (T + n - 1) * tx.num_kv_heads * tx.head_dim * 4,
            "token_ids": new, **_image_fields(self.cfg, inputs), **m.fields(),
        }


class LlamaCppEngine(NoEngine):
    """llama.cpp through llama-cpp-python's low-level API: one sequence per row in one batch,
    greedy argmax of each row's logits in numpy; F32 weights and an F32 KV cache."""

    def __init__(self, args):
        super().__init__(args)
        import llama_cpp as lc

        self.lc = lc
        t0 = time.perf_counter()
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.use_mmap = False  # resident like the other engines' weights
        self.model = lc.llama_model_load_from_file(args.model.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {args.model}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.load_seconds = time.perf_counter() - t0
        self.ctx, self.ctx_key = None, None

    def hello(self) -> dict:
        lc = self.lc
        n = lc.llama_model_n_params(self.model)
        return {"load_seconds": self.load_seconds, "n_params": int(n), "weights_bytes": int(lc.llama_model_size(self.model)),
                "threads": len(os.sched_getaffinity(0)), "system_info": lc.llama_print_system_info().decode()}

    def _context(self, n_ctx: int, n_seq: int, n_batch: int):
        lc = self.lc
        key = (n_ctx, n_seq, n_batch)
        if self.ctx_key != key:
            if self.ctx is not None:
                lc.llama_free(self.ctx)
                self.ctx = None
            p = lc.llama_context_default_params()
            p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, min(n_batch, 512), n_seq
            p.n_threads = p.n_threads_batch = self.args.threads
            p.type_k = p.type_v = 0  # GGML_TYPE_F32: the same precision as ours and HF
            p.no_perf = True
            self.ctx = lc.llama_init_from_model(self.model, p)
            if not self.ctx:
                raise RuntimeError("llama.cpp could not create a context")
            self.ctx_key = key
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        return self.ctx

    def cmd_run(self, **req) -> dict:
        lc = self.lc
        b, n = int(req["batch"]), int(req["new_tokens"])
        cfg = _gguf_config(self.args.model)
        ids = _inputs(cfg, req)["input_ids"]
        T = ids.shape[1]
        per_seq = T + n
        with Measured() as m:
            ctx = self._context(n_ctx=b * per_seq, n_seq=b, n_batch=max(b * T, b))
            batch = lc.llama_batch_init(b * T, 0, b)
            try:
                t0 = time.perf_counter()
                # Prefill: every row's prompt in one batch (sequence id = row), logits of the last token.
                k = 0
                for r in range(b):
                    for j in range(T):
                        batch.token[k] = int(ids[r, j])
                        batch.pos[k] = j
                        batch.n_seq_id[k] = 1
                        batch.seq_id[k][0] = r
                        batch.logits[k] = j == T - 1
                        k += 1
                batch.n_tokens = k
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed on the prompt")
                rows = [(r + 1) * T - 1 for r in range(b)]
                tok = self._argmax(ctx, rows)
                t1 = time.perf_counter()
                out = [[t] for t in tok]
                for step in range(1, n):
                    for r in range(b):
                        batch.token[r] = int(tok[r])
                        batch.pos[r] = T + step - 1
                        batch.n_seq_id[r] = 1
                        batch.seq_id[r][0] = r
                        batch.logits[r] = True
                    batch.n_tokens = b
                    if lc.llama_decode(ctx, batch) != 0:
                        raise RuntimeError("llama_decode failed in decode")
                    tok = self._argmax(ctx, list(range(b)))
                    for r in range(b):
                        out[r].append(int(tok[r]))
                t2 = time.perf_counter()
            finally:
                lc.llama_batch_free(batch)
        tx = cfg.text
        decode_tokens = b * (n - 1)
        return {
            "engine": "llama_cpp", "batch": b, "mode": "dense", "prompt_len": T, "new_tokens": n,
            "prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "decode_tokens": decode_tokens,
            "decode_tokens_per_second": decode_tokens / (t2 - t1), "compile_seconds": 0.0,
            "kv_cache_bytes": 2 * tx.num_layers * b * per_seq * tx.num_kv_heads * tx.head_dim * 4,
            "token_ids": out, **m.fields(),
        }

    def _argmax(self, ctx, rows):
        import numpy as np

        lc = self.lc
        out = []
        for i in rows:
            p = lc.llama_get_logits_ith(ctx, i)
            out.append(int(np.argmax(np.ctypeslib.as_array(p, shape=(self.n_vocab,)))))
        return out


def _gguf_config(path):
    from transformers import AutoConfig

    from ..io.gguf import gguf_config
    from ..io.hf_config import from_hf_config

    d = gguf_config(path)
    return from_hf_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype="float32")


ENGINES = {"none": NoEngine, "ours": OursEngine, "hf": HFEngine, "llama_cpp": LlamaCppEngine}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcache_jax.tools.bench_worker")
    p.add_argument("--engine", choices=sorted(ENGINES), required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None, help="ours: run on a device mesh data=D,model=M")
    args = p.parse_args(argv)
    # The answers get the real stdout; whatever a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(**msg):
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    from ..errors import QCacheError

    try:
        engine = ENGINES[args.engine](args)
        send(ok=True, engine=args.engine, pid=os.getpid(), **engine.hello())
    except Exception as e:  # noqa: BLE001 - reported to the driver, which raises it
        traceback.print_exc()
        send(ok=False, error=f"{type(e).__name__}: {e}" if not isinstance(e, QCacheError) else str(e))
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            break
        fn = getattr(engine, f"cmd_{cmd}", None)
        if fn is None:
            send(ok=False, error=f"the {args.engine} worker has no command {cmd!r}")
            continue
        try:
            send(ok=True, **fn(**req))
        except QCacheError as e:
            send(ok=False, error=str(e))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            send(ok=False, error=f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    from ..host_memory import use_lean_xla_flags

    use_lean_xla_flags()  # our engine's worker process: before JAX starts (BENCHMARKS.md measures with it)
    sys.exit(main())
