"""Benchmark of the attention kernels (prefill, decode, GLA lazy decode).

Run from the repository root:
    python -m qcache_jax.kernels.bench [--out BENCHMARKS.md] [--quick]

On a GPU/TPU it first checks the kernels against the reference on the device,
then times
  * prefill: our kernel vs jax.nn.dot_product_attention (implementation
    "xla" and, on GPU, "cudnn") vs the XLA reference; causal TFLOP/s;
  * decode: our kernel vs jax.nn.dot_product_attention vs the XLA reference;
    GB/s of K+V actually read, against the measured device-to-device
    bandwidth (an elementwise pass over a 1 GiB array: read + write);
  * GLA at 4k context: a lazy layer's `lazy_decode_pv` (reads V only) vs an
    anchor layer's decode returning probabilities, and vs recomputing the lazy
    layer's attention from the Q cache (a full decode with the anchor's q, K).
On CPU it runs a tiny XLA-only smoke test and says that no GPU numbers were
measured. Prints a markdown section; --out appends it to a file.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time

import jax
import jax.numpy as jnp

from ._compat import backend
from .dispatch import decode_attention, flash_attention, lazy_decode_pv, resolve_impl
from .reference import reference_attention

NOT_MEASURED = "not yet measured on GPU"


def _time(fn, *args, iters):
    """Median wall time (ms) of a jitted call, after compile and warm-up."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _try_time(fn, *args, iters):
    """_time, or the error's first line when an implementation is unsupported."""
    try:
        return _time(fn, *args, iters=iters)
    except Exception as e:  # noqa: BLE001 -- report unsupported configs, go on
        return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})"


def _fmt(x, unit=""):
    return f"{x:.3f}{unit}" if isinstance(x, float) else str(x)


def measured_bandwidth_gbs(iters):
    """Device-to-device bandwidth: x + 1 over a 1 GiB f32 array (2 GiB moved)."""
    x = jnp.zeros((1 << 28,), jnp.float32)
    ms = _time(jax.jit(lambda a: a + 1), x, iters=iters)
    return 2 * x.nbytes / (ms * 1e-3) / 1e9


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _check_on_device(impl, dtype):
    """Max |kernel - reference| for prefill and decode at a moderate size."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    b, t, hq, hkv, d = 2, 512, 8, 2, 128
    q = _rand(ks[0], (b, t, hq, d), dtype)
    k = _rand(ks[1], (b, t, hkv, d), dtype)
    v = _rand(ks[2], (b, t, hkv, d), dtype)
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
    valid = jnp.ones((b, t), bool)
    out, _ = flash_attention(q, k, v, pos, pos, valid, impl=impl)
    ref, _ = reference_attention(q, k, v, pos, pos, valid)
    err_prefill = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    lengths = jnp.asarray([t, t // 3], jnp.int32)
    out, _ = decode_attention(q[:, -1], k, v, lengths, impl=impl)
    ref, _ = decode_attention(q[:, -1], k, v, lengths, impl="xla")
    err_decode = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    return err_prefill, err_decode


def bench_prefill(impl, cfg, dtype, iters, with_cudnn):
    b, t, hq, hkv, d = cfg
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = _rand(ks[0], (b, t, hq, d), dtype)
    k = _rand(ks[1], (b, t, hkv, d), dtype)
    v = _rand(ks[2], (b, t, hkv, d), dtype)
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
    valid = jnp.ones((b, t), bool)
    # Causal: half of the 4*B*H*T*T*D multiply-adds of full attention.
    flops = 2 * b * hq * t * t * d
    rows = {}
    if impl != "xla":
        rows[f"ours ({impl})"] = _try_time(
            jax.jit(lambda *a: flash_attention(*a, impl=impl)[0]), q, k, v, pos, pos, valid, iters=iters
        )
    rows["XLA reference"] = _try_time(
        jax.jit(lambda *a: reference_attention(*a)[0]), q, k, v, pos, pos, valid, iters=iters
    )
    for name in ["xla"] + (["cudnn"] if with_cudnn else []):
        rows[f"jax.nn.dot_product_attention ({name})"] = _try_time(
            jax.jit(lambda q, k, v, n=name: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=n)),
            q,
            k,
            v,
            iters=iters,
        )
    if impl == "pallas_gpu" and hq == hkv:
        # jax's shipped Triton kernel (no GQA, index-causal only): the baseline
        # our position-masked kernel is meant to match.
        from jax.experimental.pallas.ops.gpu import attention as shipped

        rows["jax shipped pallas_gpu attention.mha"] = _try_time(
            jax.jit(lambda q, k, v: shipped.mha(q, k, v, None, causal=True, sm_scale=1 / math.sqrt(d))),
            q,
            k,
            v,
            iters=iters,
        )
    return [(name, ms, flops / (ms * 1e-3) / 1e12 if isinstance(ms, float) else "n/a") for name, ms in rows.items()]


def bench_decode(impl, cfg, dtype, iters, with_cudnn, bandwidth):
    """Anchor decode, lazy decode and Q-cache recompute at context s."""
    b, s, hq, hkv, d = cfg
    layers = 2
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    q = _rand(ks[0], (b, hq, d), dtype)
    k = _rand(ks[1], (layers, b, s, hkv, d), dtype)
    v = _rand(ks[2], (layers, b, s, hkv, d), dtype)
    lengths = jnp.full((b,), s, jnp.int32)
    anchor, lazy = jnp.int32(0), jnp.int32(1)
    kv_bytes = 2 * b * s * hkv * d * jnp.dtype(dtype).itemsize
    _, _, probs = decode_attention(q, k, v, lengths, layer=anchor, impl=impl, return_probs=True)
    rows = [
        (
            "anchor decode (out, lse)",
            kv_bytes,
            _try_time(
                jax.jit(lambda q, k, v, n, l: decode_attention(q, k, v, n, layer=l, impl=impl)),
                q,
                k,
                v,
                lengths,
                anchor,
                iters=iters,
            ),
        ),
        (
            "anchor decode + probs (GLA anchor)",
            kv_bytes,
            _try_time(
                jax.jit(lambda q, k, v, n, l: decode_attention(q, k, v, n, layer=l, impl=impl, return_probs=True)),
                q,
                k,
                v,
                lengths,
                anchor,
                iters=iters,
            ),
        ),
        (
            "GLA lazy layer: lazy_decode_pv (V only)",
            kv_bytes // 2,
            _try_time(
                jax.jit(lambda p, v, n, l: lazy_decode_pv(p, v, lengths=n, layer=l, impl=impl)),
                probs,
                v,
                lengths,
                lazy,
                iters=iters,
            ),
        ),
        # Recompute from the Q cache: anchor q and K with the lazy layer's V.
        (
            "GLA lazy layer: recompute from Q cache",
            kv_bytes,
            _try_time(
                jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl=impl)), q, k[0], v[1], lengths, iters=iters
            ),
        ),
    ]
    kv_layer = (k[0], v[0])
    if impl == "pallas_gpu":
        # jax's shipped split-K decode (its wrapper transposes K/V every call).
        from jax.experimental.pallas.ops.gpu import decode_attention as shipped

        rows.append(
            (
                "jax shipped pallas_gpu decode_attention.gqa",
                kv_bytes,
                _try_time(
                    jax.jit(lambda q, k, v, n: shipped.gqa(q, k, v, kv_seq_len=n)), q, *kv_layer, lengths, iters=iters
                ),
            )
        )
    for name in ["xla"] + (["cudnn"] if with_cudnn else []):
        rows.append(
            (
                f"jax.nn.dot_product_attention ({name})",
                kv_bytes,
                _try_time(
                    jax.jit(
                        lambda q, k, v, n, name=name: jax.nn.dot_product_attention(
                            q[:, None], k, v, key_value_seq_lengths=n, implementation=name
                        )
                    ),
                    q,
                    *kv_layer,
                    lengths,
                    iters=iters,
                ),
            )
        )
    out = []
    for name, nbytes, ms in rows:
        gbs = nbytes / (ms * 1e-3) / 1e9 if isinstance(ms, float) else "n/a"
        frac = f"{100 * gbs / bandwidth:.0f}%" if isinstance(gbs, float) and bandwidth else "n/a"
        out.append((name, ms, gbs, frac))
    return out


def run(quick: bool) -> str:
    """Runs the benchmark for the default backend; returns a markdown section."""
    dev = jax.devices()[0]
    on_accel = backend() in ("gpu", "tpu")
    impl = resolve_impl("auto")
    with_cudnn = backend() == "gpu"
    iters = 5 if quick or not on_accel else 20
    lines = [
        f"## Attention kernels: {dev.device_kind} ({dev.platform}), "
        f"jax {jax.__version__}, {datetime.date.today().isoformat()}",
        "",
        f'`impl="auto"` resolves to `{impl}` here; "ours" and the anchor/lazy rows use it.',
        "",
    ]
    if not on_accel:
        lines += [
            f"GPU numbers: **{NOT_MEASURED}**. This run is a CPU smoke test "
            "of the XLA paths only (tiny shapes); CPU times say nothing "
            "about the Pallas kernels.",
            "",
        ]
        prefill_cfgs = [(1, 128, 4, 4, 64)]
        decode_cfgs = [(1, 256, 4, 4, 64)]
        bandwidth = None
    else:
        for dtype in (jnp.bfloat16, jnp.float32):
            e_p, e_d = _check_on_device(impl, dtype)
            lines.append(
                f"Correctness on device ({jnp.dtype(dtype).name}): max "
                f"|{impl} - reference| prefill {e_p:.2e}, decode {e_d:.2e}."
            )
        bandwidth = measured_bandwidth_gbs(iters)
        lines += [
            "",
            f"Measured device-to-device bandwidth: {bandwidth:.0f} GB/s (x + 1 over 1 GiB f32, read + write).",
            "",
        ]
        prefill_cfgs = [(4, 2048, 32, 32, 128), (4, 2048, 32, 8, 128), (4, 2048, 32, 32, 80)]
        decode_cfgs = [(1, 4096, 32, 32, 128), (8, 4096, 32, 32, 128)]
        if quick:
            prefill_cfgs, decode_cfgs = prefill_cfgs[:1], decode_cfgs[:1]
    dtype = jnp.bfloat16 if on_accel else jnp.float32
    lines += [
        f"### Prefill (causal, {jnp.dtype(dtype).name})",
        "",
        "| B, T, Hq, Hkv, D | implementation | ms | TFLOP/s |",
        "|---|---|---|---|",
    ]
    for cfg in prefill_cfgs:
        for name, ms, tflops in bench_prefill(impl, cfg, dtype, iters, with_cudnn):
            lines.append(f"| {cfg} | {name} | {_fmt(ms)} | {_fmt(tflops)} |")
    lines += [
        "",
        f"### Decode, one token per row ({jnp.dtype(dtype).name})",
        "",
        "GB/s counts the K and V bytes each variant must read (V only for lazy_decode_pv).",
        "",
        "| B, S, Hq, Hkv, D | variant | ms | GB/s | % of measured BW |",
        "|---|---|---|---|---|",
    ]
    for cfg in decode_cfgs:
        rows = bench_decode(impl, cfg, dtype, iters, with_cudnn, bandwidth)
        for name, ms, gbs, frac in rows:
            lines.append(f"| {cfg} | {name} | {_fmt(ms)} | {_fmt(gbs)} | {frac} |")
        times = {name: ms for name, ms, _, _ in rows}
        lazy_ms = times["GLA lazy layer: lazy_decode_pv (V only)"]
        anchor_ms = times["anchor decode + probs (GLA anchor)"]
        if isinstance(lazy_ms, float) and isinstance(anchor_ms, float):
            lines.append(f"| {cfg} | lazy / anchor time ratio (target <= 0.55) | {lazy_ms / anchor_ms:.2f} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="append the markdown section to this file")
    parser.add_argument("--quick", action="store_true", help="fewer configurations and iterations")
    args = parser.parse_args(argv)
    section = run(args.quick)
    print(section)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
