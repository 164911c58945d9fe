"""FastV on top of Lazy Attention, and checkpoints pruned for their schedule, on the real-weights
demo model -> their section of BENCHMARKS.md.

    python -m benchmarks.fastv                 # ~10 min on 2 cores; the committed section
    python -m benchmarks.fastv --rounds 1 --new-tokens 8 --out /tmp/F.md   # a quick look

Decode speed: one process, the demo model (SmolLM2-135M + the tower trained here, float32) and
``batch`` easy-VQA questions with their images, ``new-tokens`` greedy tokens (EOS off). Every
configuration, dense, FastV alone, the shipped lazy schedules alone and with FastV on top, is
warmed up once (compiles), then ``rounds`` rounds run all of them in turn, the order reversed
every other round; each table shows medians. KV bytes are the real cache arrays; bytes per step
is :func:`qcache_jax.tools.bench.step_bytes` of each configuration's cache layout, and the
bandwidth model's ratio is dense bytes over that configuration's bytes.

Pruned checkpoints: ``qcache prune`` (:func:`qcache_jax.tools.prune.prune`) of the shipped
``gla-0.7`` variant with its own schedule. Its checkpoint bytes, its load time (``load`` with the
parameters on the device, median of ``rounds`` alternating with the unpruned one), the weights
resident after load and the bytes a decode step reads, and its decode speed against the
unpruned checkpoint on the same schedule, with the tokens compared. A pruned checkpoint runs with
``loop="unroll"`` only, so the unpruned one is measured both ways.

Writes ``benchmarks/fastv.json`` (or beside ``--out``) and the section "FastV and pruned
checkpoints" of BENCHMARKS.md, replacing an earlier one (``benchmarks.run`` keeps it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import FASTV_TITLE as TITLE, add_section_options, run_section, table  # noqa: E402
from qcache_jax.errors import QCacheError, run_entry_point  # noqa: E402
from qcache_jax.lazy.schedule import format_layers  # noqa: E402
from qcache_jax.tools import bench  # noqa: E402

MIB = 2**20
FASTV = ("2:0.5", "2:0.25")  # FastV alone; the first also on top of each lazy schedule
LAZY = ("gla-0.5", "vla-0.5", "gla-0.7")  # shipped variants (their schedules; speed does not depend on the weights)
PRUNE = "gla-0.7"


def _bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """GB/s of a jitted ``jnp.sum`` over ``gib`` GiB of float32, best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    n = int(gib * 2**30) // 4
    x = jax.block_until_ready(jnp.ones((n,), jnp.float32) * 1.5)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return n * 4 / best / 1e9


def _param_bytes(model) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(model.params)))


def measure(args, log) -> dict:
    """Every measurement of the section (see the module docstring); the pruned checkpoint is
    written to a temporary directory, removed at the end."""
    with tempfile.TemporaryDirectory(prefix="qcache-prune-") as tmp:
        return _measure(args, log, Path(tmp))


def _measure(args, log, tmp: Path) -> dict:
    import jax

    from qcache_jax import load
    from qcache_jax.demo import easy_vqa as E
    from qcache_jax.demo import smollm2_vqa as S
    from qcache_jax.tools.prune import directory_bytes, prune

    git = bench.git_state()
    bw_before = _bandwidth()
    log(f"read bandwidth {bw_before:.1f} GB/s")
    qs = E.load_split("test")[: args.batch]
    paths = E.image_paths("test")
    prompts, images = [q.question for q in qs], [[paths[q.image_id]] for q in qs]

    dense_model = load(S.checkpoint(log=log))
    variants = {v: load(S.checkpoint(v, log=log)) for v in LAZY if v in S.variants()}
    L = dense_model.num_layers

    configs = {"dense": (dense_model, None, None)}
    for fv in FASTV:
        configs[f"FastV {fv}"] = (dense_model, None, fv)
    for v, m in variants.items():
        configs[v] = (m, "auto", None)
        configs[f"{v} + FastV {FASTV[0]}"] = (m, "auto", FASTV[0])

    def kwargs(lazy, fv, **extra):
        kw = dict(lazy=lazy, max_new_tokens=args.new_tokens, eos_token_id=-1, **extra)
        if fv:
            k, r = fv.split(":")
            kw.update(fastv_layer=int(k), fastv_keep=float(r))
        return kw

    # the pruned checkpoint of the shipped gla-0.7 variant, against it unpruned (scan and unroll)
    src = S.checkpoint(PRUNE, log=log)
    pr = prune(src, tmp / "pruned")
    log(pr.describe())
    pruned = load(pr.out)
    configs[f"{PRUNE} (unroll)"] = (variants[PRUNE], "auto", None, {"loop": "unroll"})
    configs[f"{PRUNE} pruned (unroll)"] = (pruned, "auto", None, {"loop": "unroll"})

    def run(key):
        m, lazy, fv, *extra = configs[key]
        return m.generate(prompts, images, **kwargs(lazy, fv, **(extra[0] if extra else {})))

    first, runs = {}, {k: [] for k in configs}
    for k in configs:
        log(f"warm-up {k}")
        first[k] = run(k)
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(configs)[::-1]
        log(f"round {r + 1}/{args.rounds}")
        for k in order:
            res = run(k)
            runs[k].append({"decode_tokens_per_second": res.decode_tokens_per_second,
                            "prefill_seconds": res.prefill_seconds})

    rows = {}
    for k, (m, lazy, fv, *extra) in configs.items():
        res = first[k]
        opts = m.options(None, **kwargs(lazy, fv, **(extra[0] if extra else {})))
        engine, plan = m.plan(res.prompt_token_ids, [1] * len(prompts), opts)
        sb = bench.step_bytes(m.config, plan.layout, engine.dtype, reuse_probs=plan.attn.reuse_probs)
        rows[k] = dict(
            lazy_layers=res.lazy_layers, mode=res.mode, fastv=res.fastv, kv_cache_bytes=res.kv_cache_bytes,
            dense_kv_cache_bytes=res.dense_kv_cache_bytes, step_bytes=sb,
            decode_tokens_per_second=statistics.median(x["decode_tokens_per_second"] for x in runs[k]),
            prefill_seconds=statistics.median(x["prefill_seconds"] for x in runs[k]),
            per_round=[x["decode_tokens_per_second"] for x in runs[k]], tokens=res.token_ids,
            compile_seconds=res.compile_seconds,
        )

    # load times, alternating; the parameters on the device before the clock stops
    loads = {"unpruned": [], "pruned": []}
    for r in range(args.rounds):
        for name, path in ((("unpruned", src), ("pruned", pr.out)) if r % 2 == 0 else (("pruned", pr.out), ("unpruned", src))):
            t0 = time.perf_counter()
            m = load(path)
            jax.block_until_ready(m.params)
            loads[name].append(time.perf_counter() - t0)
            del m
    prune_res = dict(
        variant=PRUNE, schedule=pr.schedule.describe(), layers=pr.layers,
        checkpoint_bytes={"unpruned": directory_bytes(src), "pruned": directory_bytes(pr.out)},
        load_seconds={k: statistics.median(v) for k, v in loads.items()}, load_runs=loads,
        param_bytes={"unpruned": _param_bytes(variants[PRUNE]), "pruned": _param_bytes(pruned)},
        same_tokens=rows[f"{PRUNE} (unroll)"]["tokens"] == rows[f"{PRUNE} pruned (unroll)"]["tokens"]
        and rows[PRUNE]["tokens"] == rows[f"{PRUNE} pruned (unroll)"]["tokens"],
    )
    bw_after = _bandwidth()
    for r in rows.values():
        r.pop("tokens")
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), git=git, machine=bench.machine(),
                jax=jax.__version__, num_layers=L, batch=len(prompts), new_tokens=args.new_tokens, rounds=args.rounds,
                image_tokens=dense_model.config.image_seq_length, bandwidth_gbps=[bw_before, bw_after], rows=rows,
                prune=prune_res)


def render(res: dict) -> str:
    rows, pr = res["rows"], res["prune"]
    d = rows["dense"]
    L = [TITLE, "",
         f"Generated by `python -m benchmarks.fastv` (commit {res['git'].get('commit', '?')[:7]}"
         f"{', uncommitted changes' if res['git'].get('dirty') else ''}) on {res['date']}, {res['machine'].get('cpu', '?')}, "
         f"jax {res['jax']}; read bandwidth {res['bandwidth_gbps'][0]:.1f} GB/s before and {res['bandwidth_gbps'][1]:.1f} "
         f"after. The demo model (SmolLM2-135M-Instruct with the tower trained here, {res['num_layers']} layers, "
         f"float32), a batch of {res['batch']} easy-VQA questions with one {res['image_tokens']}-token image each, "
         f"{res['new_tokens']} greedy new tokens; one warm-up call per configuration, then {res['rounds']} rounds over "
         "all of them, the order reversed every other round; medians. KV: the real cache arrays. Bytes per step: the "
         "weights and cache arrays one decode step reads (`tools.bench.step_bytes` of the configuration's cache "
         "layout); bandwidth model = dense bytes / these bytes. Accuracy of the same configurations: RETENTION.md, "
         "\"FastV on top of Lazy Attention\".", ""]
    L += table(["configuration", "lazy layers (run)", "FastV K:R", "KV MiB", "KV saved", "bytes per step MiB",
                "decode tok/s", "vs dense", "bandwidth model", "prefill s"],
               [[k, format_layers(r["lazy_layers"]) if r["lazy_layers"] else "none", r["fastv"] or "-",
                 f"{r['kv_cache_bytes'] / MIB:.2f}", f"{100 * (1 - r['kv_cache_bytes'] / r['dense_kv_cache_bytes']):.1f}%",
                 f"{r['step_bytes']['bytes'] / MIB:.1f}", f"{r['decode_tokens_per_second']:.1f}",
                 f"{r['decode_tokens_per_second'] / d['decode_tokens_per_second']:.2f}x",
                 f"{d['step_bytes']['bytes'] / r['step_bytes']['bytes']:.2f}x", f"{r['prefill_seconds']:.3f}"]
                for k, r in rows.items()])
    cb, ls, pb = pr["checkpoint_bytes"], pr["load_seconds"], pr["param_bytes"]
    up, pp = rows[f"{pr['variant']} (unroll)"], rows[f"{pr['variant']} pruned (unroll)"]
    L += ["", f"**`qcache prune`** of the shipped `{pr['variant']}` variant with its schedule ({pr['schedule']}): "
          f"q_proj/k_proj removed from {len(pr['layers'])} layers.", ""]
    L += table(["", "unpruned", "pruned", "saved"],
               [["checkpoint bytes", f"{cb['unpruned']:,}", f"{cb['pruned']:,}", f"{100 * (1 - cb['pruned'] / cb['unpruned']):.1f}%"],
                ["load s (median)", f"{ls['unpruned']:.2f}", f"{ls['pruned']:.2f}", f"{100 * (1 - ls['pruned'] / ls['unpruned']):.1f}%"],
                ["parameters resident after load", f"{pb['unpruned']:,}", f"{pb['pruned']:,}",
                 f"{100 * (1 - pb['pruned'] / pb['unpruned']):.1f}%"],
                ["bytes a decode step reads", f"{up['step_bytes']['bytes']:,}", f"{pp['step_bytes']['bytes']:,}",
                 f"{100 * (1 - pp['step_bytes']['bytes'] / up['step_bytes']['bytes']):.1f}%"],
                ["decode tok/s (loop unroll)", f"{up['decode_tokens_per_second']:.1f}", f"{pp['decode_tokens_per_second']:.1f}",
                 f"{pp['decode_tokens_per_second'] / up['decode_tokens_per_second']:.2f}x"]])
    L += ["", f"Same greedy tokens, pruned and unpruned (scan and unroll): **{'yes' if pr['same_tokens'] else 'NO'}**. "
          "A decode step never read a GLA lazy layer's q_proj/k_proj (it uses the anchor's queries and keys), so "
          "pruning saves checkpoint bytes, load time and resident memory, not bytes per step. Per-round decode tok/s: "
          + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in r["per_round"]) for k, r in rows.items()) + "."]
    return "\n".join(L).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fastv", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    add_section_options(ap, "fastv")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.new_tokens < 2:
        raise QCacheError("--rounds and --batch must be >= 1 and --new-tokens >= 2")
    return run_section(args, "fastv", TITLE, render, lambda log: measure(args, log))


if __name__ == "__main__":
    sys.exit(run_entry_point("benchmarks.fastv", main))
