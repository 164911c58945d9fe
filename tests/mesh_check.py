"""Run by tests/test_mesh.py in a subprocess with 8 CPU devices (the test process keeps one):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_check.py OUT.json

A tiny GQA LLaVA (8 query heads, 4 KV heads: split over a model axis of 4, replicated over one
of 8; vocabulary split) is saved as a checkpoint and loaded by Orbax onto meshes (1, 8),
(2, 4) and (8, 1). For dense, GLA and VLA it records: whether generate's greedy tokens equal
the single-device run's (computed here too), the largest logit difference (generate's kept
logits, and full-sequence logits), whether a second batch of prompts in the same buckets
compiled anything, and every parameter and cache array whose sharding differs from the table
in docs/architecture.md ("Scaling out"). Also the attention entry points alone on a head
layout the model does not cover (each shard reads one KV head per query head). Writes one
JSON object; the test asserts on it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qcache_jax.api import load
from qcache_jax.demo.hf_models import tiny_config
from qcache_jax.io.checkpoint import save_checkpoint
from qcache_jax.nn.llava import Llava
from qcache_jax.runtime.engine import Sampling

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MESHES = [(1, 8), (2, 4), (8, 1)]
MODES = [("dense", None, "vla"), ("gla", "1-2", "gla"), ("vla", "2", "vla")]
# Full-sequence logits, one mode per mesh (each is one more compilation).
LOGITS_MODE = {(1, 8): "dense", (2, 4): "gla", (8, 1): "vla"}
CFG = tiny_config(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8,
                  vocab_size=136, vision_layers=1)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: COMPILES.append(event) if event == BACKEND_COMPILE else None
)


def doc_table():
    """The sharding table of docs/architecture.md: [(names, spec, condition)]."""
    section = DOCS.read_text().split("## Scaling out", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`P\((.*)\)`", cells[1]) if len(cells) == 3 else None
        if m:
            rows.append((cells[0], eval(f"P({m.group(1)})", {"P": P}), cells[2]))
    return rows


def expected(spec: P, condition: str, m: int) -> P:
    size = {"Hq": CFG.text.num_heads, "Hkv": CFG.text.num_kv_heads, "F": CFG.text.intermediate_size,
            "V": CFG.text.vocab_size}.get(condition)
    if size is None or (m > 1 and size % m == 0):
        return spec
    return P(*(None if a == "model" else a for a in spec))


def param_rule(path: str, table):
    for first, spec, cond in table:
        names = re.findall(r"`([^`]+)`", first)
        if names and "." in names[0] and fnmatch.fnmatchcase(path, names[0]):
            return spec, cond
    (spec, cond), = [(s, c) for first, s, c in table if first.startswith("every other parameter")]
    return spec, cond


def cache_rule(field: str, table):
    (spec, cond), = [(s, c) for first, s, c in table if first.startswith("cache") and f"`{field}`" in first]
    return spec, cond


def wrong_shardings(tree, rule, mesh, table, m):
    """Paths of leaves whose sharding is not the documented one."""
    bad = []
    for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)
        spec, cond = rule(path, table)
        want = NamedSharding(mesh, expected(spec, cond, m))
        if not x.sharding.is_equivalent_to(want, x.ndim):
            bad.append(f"{path}: {x.sharding.spec} (docs: {want.spec})")
    return bad


def state_wrong(state, schedule, mesh, table, m):
    bad = wrong_shardings(
        {"layers": state.layers, "n_img": state.n_img, "n_txt": state.n_txt, "positions": state.positions},
        lambda path, t: cache_rule(path.split(".")[-1], t), mesh, table, m,
    )
    for i, layer in enumerate(state.layers):  # the lazy cache's missing K arrays stay missing
        if ((layer.k_img is not None), (layer.k_txt is not None)) != tuple(schedule.stores_k(i)):
            bad.append(f"layer {i}: key arrays {layer.k_img is not None, layer.k_txt is not None}")
    return bad


def batch(rng, lengths):
    """HF-style inputs: row 0 has an image; rows right-padded."""
    per = CFG.image_tokens_per_image
    rows = []
    for i, n in enumerate(lengths):
        text = [int(t) for t in rng.integers(5, CFG.text.vocab_size - 1, n)]
        rows.append([1] + ([CFG.image_token_id] * per if i == 0 else []) + text)
    ids = np.full((len(rows), max(map(len, rows))), 3, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pv = rng.standard_normal((1, 3, CFG.vision.image_size, CFG.vision.image_size)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv)


def kernels_alone(impl: str):
    """attend (with its lse) / decode_segments / lazy_pv_segments with kernels ``impl`` on mesh (2, 4) with 12
    query and 6 KV heads (KV replicated: each shard reads one KV head per query head) against
    no mesh: the largest difference."""
    from qcache_jax.nn.attention import attend, decode_segments, lazy_pv_segments

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    k0 = jax.random.split(jax.random.PRNGKey(0), 3)
    b, t, d = 2, 16, 8
    q, k, v = (jax.random.normal(k0[0], (b, 12, t, d)), jax.random.normal(k0[1], (b, 6, t, d)),
               jax.random.normal(k0[2], (b, 6, t, d)))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.ones((b, t), bool)
    qd, lens, lens2 = q[:, :, 0], jnp.array([5, 16]), jnp.array([2, 9])
    segs = [(k, v, lens), (v, k, lens2)]
    probs = decode_segments(qd, segs, return_probs=True, impl=impl)[2]  # per segment (p, lse)
    values = [(v, lens), (k, lens2)]
    pairs = [
        (attend(q, k, v, pos, pos, valid, impl=impl), attend(q, k, v, pos, pos, valid, impl=impl, mesh=mesh)),
        (attend(q, k, v, pos, pos, valid, impl=impl, return_lse=True),  # a VLA lazy layer's two halves merge by lse
         attend(q, k, v, pos, pos, valid, impl=impl, mesh=mesh, return_lse=True)),
        (decode_segments(qd, segs, return_probs=True, impl=impl),
         decode_segments(qd, segs, return_probs=True, impl=impl, mesh=mesh)),
        (lazy_pv_segments(probs, values, impl=impl), lazy_pv_segments(probs, values, impl=impl, mesh=mesh)),
    ]
    return max(float(jnp.max(jnp.abs(x - y)))
               for a, b_ in pairs for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b_)))


def main(out: str) -> None:
    assert jax.device_count() == 8, jax.device_count()
    res = {"devices": jax.device_count(), "runs": [],
           "kernels_max_diff": {impl: kernels_alone(impl) for impl in ("xla", "pallas_gpu_interpret")}}
    table = doc_table()
    res["doc_rows"] = len(table)
    rng = np.random.default_rng(0)
    first, second = batch(rng, [4, 2, 6]), batch(rng, [5, 3, 2])  # same buckets, other tokens and lengths
    with tempfile.TemporaryDirectory() as tmp:
        params = nnx.to_pure_dict(nnx.state(Llava(CFG, rngs=nnx.Rngs(0))))
        # Larger weights than the 0.02 init: peaked attention and clear greedy choices.
        params = jax.tree.map(lambda x: np.asarray(x) * (8.0 if x.ndim >= 2 else 1.0), params)
        save_checkpoint(Path(tmp), CFG, params)
        single = load(tmp)
        ref = {name: single.generate(**first, lazy=lazy, mode=mode, max_new_tokens=8, return_logits=True)
               for name, lazy, mode in MODES}
        ref_logits = {name: single.logits(first["input_ids"], first["pixel_values"], first["attention_mask"],
                                          lazy=lazy, mode=mode) for name, lazy, mode in MODES}
        for shape in MESHES:
            model = load(tmp, mesh=f"data={shape[0]},model={shape[1]}")
            m = shape[1]
            params_bad = wrong_shardings(model.params, param_rule, model.mesh, table, m)
            for name, lazy, mode in MODES:
                r = model.generate(**first, lazy=lazy, mode=mode, max_new_tokens=8, return_logits=True)
                engine, plan = model.plan(r.prompt_token_ids, [1, 0, 0], model.options(lazy=lazy, mode=mode,
                                                                                        max_new_tokens=8,
                                                                                        return_logits=True))
                state, logits = engine.prefill(plan, engine.prepare(r.prompt_token_ids, first["pixel_values"], plan))
                cache_bad = state_wrong(state, plan.schedule, model.mesh, table, m)
                loop = engine.decode(plan, state, logits, Sampling.make(8), engine.prepare(
                    r.prompt_token_ids, first["pixel_values"], plan).active)
                cache_bad += [f"after decode: {x}"
                              for x in state_wrong(loop.state, plan.schedule, model.mesh, table, m)]
                n = len(COMPILES)
                again = model.generate(**second, lazy=lazy, mode=mode, max_new_tokens=8, return_logits=True)
                run = {
                    "mesh": list(shape), "mode": name, "cache_rows": plan.layout.batch,
                    "same_tokens": r.token_ids == ref[name].token_ids,
                    "tokens": r.token_ids, "ref_tokens": ref[name].token_ids,
                    "logits_max_diff": max(float(np.abs(a - b).max()) for a, b in zip(r.logits, ref[name].logits)),
                    "second_prompt_compiles": len(COMPILES) - n,
                    "second_prompt_compile_seconds": again.compile_seconds,
                    "second_same_tokens": again.token_ids == single.generate(
                        **second, lazy=lazy, mode=mode, max_new_tokens=8, return_logits=True).token_ids,
                    "params_wrong": params_bad, "cache_wrong": cache_bad,
                }
                if LOGITS_MODE[shape] == name:
                    full = model.logits(first["input_ids"], first["pixel_values"], first["attention_mask"], lazy=lazy,
                                        mode=mode)
                    run["full_logits_max_diff"] = float(np.abs(full - ref_logits[name]).max())
                res["runs"].append(run)
                print(json.dumps({k: run[k] for k in ("mesh", "mode", "same_tokens", "logits_max_diff")}), flush=True)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
