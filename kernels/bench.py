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
On CPU it measures the "xla" fast path (kernels/xla.py): the memory
bandwidth (a jitted jnp.sum over a 1 GiB f32 array), decode attention and lazy
P @ V over a 2880-token head-major cache (B=4, Hkv=16, D=64, GQA 1/4/8, f32
and bf16) in ms, GB/s and % of that bandwidth, and the prefill direct formula
vs the blocked online softmax for T = 128..4096 (the DIRECT_MAX_TK threshold);
it says that no GPU numbers were measured. Prints a markdown section; --out
appends it to a file.

Layout is head-major: q [B, Hq, T, D], k/v [B, Hkv, T, D]; jax's baselines
(`jax.nn.dot_product_attention`, the shipped Pallas kernels) take
[B, T, H, D] and get transposed copies made outside the timed calls.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time

import jax
import jax.numpy as jnp

from . import xla
from ._compat import backend
from .dispatch import decode_attention, flash_attention, lazy_decode_pv, resolve_impl
from .reference import reference_attention

NOT_MEASURED = "not yet measured on GPU"


def _time(fn, *args, iters, stat=statistics.median):
    """Median (or `stat`) wall time (ms) of a jitted call, after compile and warm-up."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * stat(times)


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


def sum_bandwidth_gbs(iters):
    """Read bandwidth: a jitted jnp.sum over a 1 GiB f32 array (best of iters)."""
    x = jnp.ones((1 << 28,), jnp.float32)
    ms = _time(jax.jit(jnp.sum), x, iters=iters, stat=min)
    return x.nbytes / (ms * 1e-3) / 1e9


def _bthd(x):
    """[B, H, T, D] -> [B, T, H, D] copy for jax's baselines."""
    return jnp.swapaxes(x, 1, 2)


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _check_on_device(impl, dtype):
    """Max |kernel - reference| for prefill and decode at a moderate size."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    b, t, hq, hkv, d = 2, 512, 8, 2, 128
    q = _rand(ks[0], (b, hq, t, d), dtype)
    k = _rand(ks[1], (b, hkv, t, d), dtype)
    v = _rand(ks[2], (b, hkv, t, d), dtype)
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
    valid = jnp.ones((b, t), bool)
    out, _ = flash_attention(q, k, v, pos, pos, valid, impl=impl)
    ref, _ = reference_attention(q, k, v, pos, pos, valid)
    err_prefill = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    lengths = jnp.asarray([t, t // 3], jnp.int32)
    out, _ = decode_attention(q[:, :, -1], k, v, lengths, impl=impl)
    ref, _ = decode_attention(q[:, :, -1], k, v, lengths, impl="xla")
    err_decode = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    return err_prefill, err_decode


def bench_prefill(impl, cfg, dtype, iters, with_cudnn):
    b, t, hq, hkv, d = cfg
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = _rand(ks[0], (b, hq, t, d), dtype)
    k = _rand(ks[1], (b, hkv, t, d), dtype)
    v = _rand(ks[2], (b, hkv, t, d), dtype)
    pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
    valid = jnp.ones((b, t), bool)
    qt, kt, vt = _bthd(q), _bthd(k), _bthd(v)
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
            qt,
            kt,
            vt,
            iters=iters,
        )
    if impl == "pallas_gpu" and hq == hkv:
        # jax's shipped Triton kernel (no GQA, index-causal only): the baseline
        # our position-masked kernel is meant to match.
        from jax.experimental.pallas.ops.gpu import attention as shipped

        rows["jax shipped pallas_gpu attention.mha"] = _try_time(
            jax.jit(lambda q, k, v: shipped.mha(q, k, v, None, causal=True, sm_scale=1 / math.sqrt(d))),
            qt,
            kt,
            vt,
            iters=iters,
        )
    return [(name, ms, flops / (ms * 1e-3) / 1e12 if isinstance(ms, float) else "n/a") for name, ms in rows.items()]


def bench_decode(impl, cfg, dtype, iters, with_cudnn, bandwidth):
    """Anchor decode, lazy decode and Q-cache recompute at context s."""
    b, s, hq, hkv, d = cfg
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    q = _rand(ks[0], (b, hq, d), dtype)
    k0, v0, v1 = (_rand(key, (b, hkv, s, d), dtype) for key in ks[1:])  # anchor K/V, lazy layer V
    lengths = jnp.full((b,), s, jnp.int32)
    kv_bytes = 2 * b * s * hkv * d * jnp.dtype(dtype).itemsize
    _, _, probs = decode_attention(q, k0, v0, lengths, impl=impl, return_probs=True)
    dec = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl=impl))
    rows = [
        ("anchor decode (out, lse)", kv_bytes, _try_time(dec, q, k0, v0, lengths, iters=iters)),
        (
            "anchor decode + probs (GLA anchor)",
            kv_bytes,
            _try_time(
                jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl=impl, return_probs=True)),
                q,
                k0,
                v0,
                lengths,
                iters=iters,
            ),
        ),
        (
            "GLA lazy layer: lazy_decode_pv (V only)",
            kv_bytes // 2,
            _try_time(
                jax.jit(lambda p, v, n: lazy_decode_pv(p, v, lengths=n, impl=impl)), probs, v1, lengths, iters=iters
            ),
        ),
        # Recompute from the Q cache: anchor q and K with the lazy layer's V.
        ("GLA lazy layer: recompute from Q cache", kv_bytes, _try_time(dec, q, k0, v1, lengths, iters=iters)),
    ]
    kt, vt = _bthd(k0), _bthd(v0)  # [B, S, Hkv, D] copies for jax's baselines
    if impl == "pallas_gpu":
        # jax's shipped split-K decode (its wrapper transposes K/V every call).
        from jax.experimental.pallas.ops.gpu import decode_attention as shipped

        rows.append(
            (
                "jax shipped pallas_gpu decode_attention.gqa",
                kv_bytes,
                _try_time(jax.jit(lambda q, k, v, n: shipped.gqa(q, k, v, kv_seq_len=n)), q, kt, vt, lengths, iters=iters),
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
                    kt,
                    vt,
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


def cpu_xla_section(quick):
    """The "xla" fast path on this CPU: bandwidth, decode, prefill threshold."""
    iters = 7 if quick else 21
    bandwidth = sum_bandwidth_gbs(iters)
    b, hkv, s, d = 4, 16, 2880, 64
    lines = [
        "### XLA fast path (`impl=\"xla\"`) on this CPU",
        "",
        f"Memory bandwidth: **{bandwidth:.1f} GB/s** (jitted `jnp.sum` over a 1 GiB f32 array, best of {iters}).",
        "",
        f"Decode over a {s}-token head-major cache, B={b}, Hkv={hkv}, D={d}; best of {iters} "
        "(GB/s counts the K+V bytes, V only for lazy P @ V).",
        "",
        "| dtype | GQA g | decode ms | GB/s | % BW | lazy P@V ms | GB/s | % BW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    key = jax.random.PRNGKey(3)
    for dtype in (jnp.float32, jnp.bfloat16):
        k = _rand(key, (b, hkv, s, d), dtype)
        v = _rand(jax.random.fold_in(key, 1), (b, hkv, s, d), dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        for g in (1, 4, 8):
            q = _rand(jax.random.fold_in(key, g), (b, hkv * g, d), dtype)
            probs = decode_attention(q, k, v, lengths, impl="xla", return_probs=True)[2]
            ms_dec = _time(
                jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, impl="xla")), q, k, v, lengths,
                iters=iters, stat=min,
            )
            ms_pv = _time(
                jax.jit(lambda p, v, n: lazy_decode_pv(p, v, lengths=n, impl="xla")), probs, v, lengths,
                iters=iters, stat=min,
            )
            gb_dec = 2 * k.nbytes / (ms_dec * 1e-3) / 1e9
            gb_pv = v.nbytes / (ms_pv * 1e-3) / 1e9
            lines.append(
                f"| {jnp.dtype(dtype).name} | {g} | {ms_dec:.2f} | {gb_dec:.1f} | {100 * gb_dec / bandwidth:.0f}% "
                f"| {ms_pv:.2f} | {gb_pv:.1f} | {100 * gb_pv / bandwidth:.0f}% |"
            )
    lengths_t = (128, 256, 512, 1024) if quick else (128, 256, 512, 1024, 2048, 4096)
    bh, dh = (1, 8), 128
    lines += [
        "",
        f"Prefill, causal, f32, B={bh[0]}, H={bh[1]}, D={dh}: direct formula vs blocked online softmax "
        f"({xla.PREFILL_BLOCK_Q}x{xla.PREFILL_BLOCK_K} blocks); ms, best of 3. "
        f"The xla impl uses the direct formula for Tk <= {xla.DIRECT_MAX_TK}.",
        "",
        "| T | direct ms | blocked ms |",
        "|---|---|---|",
    ]
    for t in lengths_t:
        q, k, v = (_rand(jax.random.fold_in(key, 10 + i), (bh[0], bh[1], t, dh), jnp.float32) for i in range(3))
        pos = jnp.tile(jnp.arange(t, dtype=jnp.int32), (bh[0], 1))
        valid = jnp.ones((bh[0], t), bool)
        direct = _time(jax.jit(lambda *a: reference_attention(*a)[0]), q, k, v, pos, pos, valid, iters=3, stat=min)
        blocked = _time(
            jax.jit(lambda *a: xla.prefill_blocked(*a, block_q=xla.PREFILL_BLOCK_Q, block_k=xla.PREFILL_BLOCK_K)[0]),
            q, k, v, pos, pos, valid, iters=3, stat=min,
        )
        lines.append(f"| {t} | {direct:.1f} | {blocked:.1f} |")
    return lines + [""]


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
            f"GPU numbers: **{NOT_MEASURED}**. This run measures the XLA "
            "paths only; CPU times say nothing about the Pallas kernels.",
            "",
        ]
        lines += cpu_xla_section(quick)
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
