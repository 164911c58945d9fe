"""The serving runtime below HTTP: the slot engine (prefill / insert / step / release) against
``generate``, per-row sampling against plain numpy, the KV budget -> slot count from real
arrays, and the scheduler's queue, admission policy and cancellation."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from conftest import make_inputs

from qcache_jax import QCacheError, load
from qcache_jax.lazy.attention import LazyAttention
from qcache_jax.lazy.cache import kv_cache_bytes
from qcache_jax.runtime.sampling import sample_rows
from qcache_jax.runtime.scheduler import QueueFull, Request, Scheduler
from qcache_jax.runtime.slots import RowSampling, SlotEngine, SlotLayout, slot_bytes, slots_for_budget

SCHEDULES = [("none", None), ("1-3", "gla"), ("1-2", "vla")]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_config(tiny_hf_dir):
    import transformers

    return transformers.AutoConfig.from_pretrained(tiny_hf_dir)


def _engine(model, lazy, mode, slots=3, text_len=48):
    sched = model.resolve_lazy(lazy, mode)
    cfg = model.config
    layout = SlotLayout(slots=slots, image_len=cfg.image_tokens_per_image, text_len=text_len, schedule=sched,
                        max_images=1)
    return SlotEngine(model.graphdef, model.params, cfg, layout, attn=LazyAttention(mode=sched.mode),
                      pad_id=model.pad_id())


def _requests(hf_config, rng, n, images=True):
    out = []
    for i in range(n):
        ids, pv = make_inputs(hf_config, 1, 4 + 3 * i, rng, images_per_row=1 if images or i % 2 else 0)
        out.append((ids[0].tolist(), pv))
    return out


@pytest.mark.parametrize("lazy,mode", SCHEDULES)
def test_slots_equal_generate_with_staggered_admission(model, hf_config, rng, lazy, mode):
    """5 requests through 3 slots, admitted one per step as slots free up, each a different
    length (with and without an image): every token equals generate's for that prompt alone."""
    eng = _engine(model, lazy, mode)
    reqs = _requests(hf_config, rng, 5, images=False)
    n_new = [9, 4, 7, 5, 8]
    refs = [model.generate(input_ids=np.array([p]), pixel_values=pv, lazy=lazy, mode=mode, max_new_tokens=k,
                           eos_token_id=-1).token_ids[0] for (p, pv), k in zip(reqs, n_new)]
    out, slot_of, pending, free = {i: [] for i in range(5)}, {}, list(range(5)), [0, 1, 2]
    while pending or slot_of:
        if pending and free:
            i, s = pending.pop(0), free.pop(0)
            out[i].append(eng.insert(s, eng.prefill(*reqs[i], RowSampling())))
            slot_of[i] = s
        tokens = eng.step()
        for i, s in list(slot_of.items()):
            out[i].append(int(tokens[s]))
            if len(out[i]) >= n_new[i]:
                eng.release(s)
                free.append(s)
                del slot_of[i]
    for i in range(5):
        assert out[i][: n_new[i]] == refs[i], (i, out[i], refs[i])
    assert not eng.active().any()


def test_budget_to_slots_from_real_arrays(model):
    cfg = model.config
    dense, gla, vla = (model.resolve_lazy(lz, md) for lz, md in SCHEDULES)
    img, txt = cfg.image_tokens_per_image, 100
    for sched in (dense, gla, vla):
        per, dense_per = slot_bytes(cfg, sched, img, txt, np.float32)
        layout = SlotLayout(2, img, txt, sched)
        e = SlotEngine(model.graphdef, model.params, cfg, layout, attn=LazyAttention(mode=sched.mode))
        assert kv_cache_bytes(e.pool.state) == 2 * per == e.pool_kv_bytes  # the pool's real arrays
        budget = 10 * dense_per + dense_per // 2
        assert slots_for_budget(budget, cfg, sched, img, txt, np.float32) == budget // per
    # 3 of 4 layers lazy in GLA store no keys at all: 1 - 3/8 of the dense bytes per slot
    g, d = slot_bytes(cfg, gla, img, txt, np.float32)
    assert g / d == pytest.approx(1 - 3 / 8)
    v, _ = slot_bytes(cfg, vla, img, txt, np.float32)  # VLA: only the visual keys of 2 layers
    assert v / d == pytest.approx(1 - 2 / 8 * img / (img + txt))
    budget = 10 * d
    assert slots_for_budget(budget, cfg, gla, img, txt, np.float32) > slots_for_budget(budget, cfg, dense, img, txt,
                                                                                        np.float32)
    with pytest.raises(QCacheError, match="holds no slot"):
        slots_for_budget(d - 1, cfg, dense, img, txt, np.float32)


def test_sample_rows_matches_numpy(rng):
    """Greedy rows are argmax; a sampling row's token depends only on its own key and logits
    (shuffling the batch does not change it); top-k 1 and a tiny top-p are argmax too."""
    b, v = 6, 40
    logits = rng.standard_normal((b, v)).astype(np.float32) * 3
    keys = jax.random.split(jax.random.PRNGKey(0), b)
    temp = np.array([0, 0.8, 1.0, 0.7, 1.3, 0.5], np.float32)
    top_k = np.array([0, 0, 1, 0, 5, 0], np.int32)
    top_p = np.array([1, 1, 1, 1e-6, 0.9, 1], np.float32)
    tok = np.asarray(sample_rows(logits, keys, temp, top_k, top_p))
    argmax = logits.argmax(-1)
    assert tok[0] == argmax[0] and tok[2] == argmax[2] and tok[3] == argmax[3]
    assert np.isin(tok[4], np.argsort(-logits[4])[:5])
    perm = np.array([5, 3, 1, 0, 4, 2])
    shuffled = np.asarray(sample_rows(logits[perm], keys[perm], temp[perm], top_k[perm], top_p[perm]))
    np.testing.assert_array_equal(shuffled, tok[perm])
    # a row's draw is categorical over its own filtered logits: the frequencies follow softmax
    many = np.asarray(jax.vmap(lambda k: sample_rows(logits[1:2], k[None], temp[1:2], top_k[1:2], top_p[1:2]))(
        jax.random.split(jax.random.PRNGKey(1), 4000)))[:, 0]
    p = np.exp((logits[1] - logits[1].max()) / 0.8)
    p /= p.sum()
    freq = np.bincount(many, minlength=v) / len(many)
    assert np.abs(freq - p).max() < 0.04
    greedy = np.asarray(sample_rows(logits, keys, np.zeros(b, np.float32), top_k, top_p))
    np.testing.assert_array_equal(greedy, argmax)


def test_same_seed_same_tokens_in_any_slot(model, hf_config, rng):
    eng = _engine(model, "none", None)
    (p, pv), = _requests(hf_config, rng, 1)
    runs = []
    for slot, neighbour_seed in ((0, 99), (2, 1234)):
        s = RowSampling(temperature=0.9, top_p=0.95, seed=7)
        toks = [eng.insert(slot, eng.prefill(p, pv, s))]
        other = eng.prefill(p, pv, RowSampling(temperature=1.0, seed=neighbour_seed))  # another neighbour
        eng.insert(1, other)
        toks += [int(eng.step()[slot]) for _ in range(6)]
        eng.release(slot)
        eng.release(1)
        runs.append(toks)
    assert runs[0] == runs[1]


def _wait(handle, timeout=60):
    toks, finish, t0 = [], None, time.monotonic()
    while finish is None:
        ev = handle.events.get(timeout=max(timeout - (time.monotonic() - t0), 0.1))
        toks += ev.tokens
        finish = ev.finish
    return toks, finish


def test_scheduler_queue_cancel_and_no_recompile(model, hf_config, rng):
    reqs = _requests(hf_config, rng, 4)
    refs = [model.generate(input_ids=np.array([p]), pixel_values=pv, lazy="1-3", mode="gla", max_new_tokens=6,
                           eos_token_id=-1).token_ids[0] for p, pv in reqs]
    eng = _engine(model, "1-3", "gla", slots=2)
    eng.warmup(prompt_lengths=(16, 32), image_counts=(0, 1))
    compiles = eng.compiles
    backend = []  # every XLA compilation, also any the engine's own count would miss
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: backend.append(name) if "backend_compile" in name else None)
    warm = eng.prefill(*reqs[0], RowSampling(temperature=0.5, seed=3))  # the PRNG's first use
    eng.insert(0, warm)
    eng.release(0)
    n_backend = len(backend)
    sched = Scheduler(eng, max_queue=2).start()
    try:
        n_img = model.config.image_tokens_per_image
        handles = [sched.submit(Request(p, pv, n_img, max_tokens=6)) for p, pv in reqs]
        assert [_wait(h) for h in handles] == [(r, "length") for r in refs]
        # two slots busy and two waiting: a fifth request is refused, not queued without bound
        long = [sched.submit(Request(p, pv, n_img, max_tokens=30)) for p, pv in reqs]
        with pytest.raises(QueueFull, match="max-queue 2"):
            sched.submit(Request(reqs[0][0], reqs[0][1], n_img, max_tokens=4))
        for h in long:
            h.cancel()
        for h in long:
            assert _wait(h)[1] == "abort"
        # EOS ends a request with its EOS token emitted
        first = refs[0][2]
        toks, finish = _wait(sched.submit(Request(reqs[0][0], reqs[0][1], n_img, max_tokens=6, eos=(first,))))
        assert finish == "stop" and toks == refs[0][:3]
        with pytest.raises(QCacheError, match="does not fit a slot"):
            sched.submit(Request(reqs[0][0], reqs[0][1], n_img, max_tokens=200))
        assert eng.compiles == compiles  # every prompt fell in a warmed-up bucket
        assert len(backend) == n_backend, backend[n_backend:]
        stats = sched.stats()
        assert stats["slots_active"] == 0 and stats["queue_length"] == 0 and stats["kv_bytes_in_use"] == 0
    finally:
        sched.shutdown(timeout=5)


def test_prefill_budget_bounds_admission_per_step(model, hf_config, rng):
    """With a budget of one prompt's tokens, a burst of 3 newcomers is admitted one per decode
    step (each later request's first token comes a step later)."""
    eng = _engine(model, "none", None, slots=3)
    sched = Scheduler(eng, prefill_budget=1)
    reqs = _requests(hf_config, rng, 3)
    n_img = model.config.image_tokens_per_image
    first_step: dict = {}

    def listen(i):
        def on_event(ev):
            if ev.tokens and i not in first_step:
                first_step[i] = sched.steps  # decode steps run before this request's first token
        return on_event

    handles = [sched.submit(Request(p, pv, n_img, max_tokens=8), listener=listen(i)) for i, (p, pv) in
               enumerate(reqs)]
    sched.start()
    try:
        deadline = time.monotonic() + 60
        while not all(h.finished for h in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sched.shutdown(timeout=5)
    steps_at_first = [first_step[i] for i in range(3)]
    assert steps_at_first == [0, 1, 2]


MESH_CHECK = """
import json, sys
import numpy as np
from qcache_jax import load
from qcache_jax.runtime.scheduler import Request
from qcache_jax.serve import service

ck, out = sys.argv[1], {}
ref = load(ck)
ids, _ = ref.encode("what color is it", [])
for spec in ("data=2,model=1", "data=1,model=2", "data=2,model=2"):
    model = load(ck, mesh=spec)
    for lazy, mode in (("none", None), ("1-3", "gla"), ("1-2", "vla")):
        want = ref.generate(input_ids=np.array([ids]), lazy=lazy, mode=mode, max_new_tokens=6,
                            eos_token_id=-1).token_ids[0]
        svc = service.build(model, model.resolve_lazy(lazy, mode), service.ServeConfig(kv_budget=2**19,
                                                                                     max_model_len=128))
        h = svc.scheduler.submit(Request(ids, None, 0, max_tokens=6))
        got = []
        while True:
            ev = h.events.get(timeout=300)
            got += ev.tokens
            if ev.finish:
                break
        out[f"{spec} {lazy}"] = [got == want, svc.engine.layout.slots % 2 if "data=2" in spec else 0]
        svc.scheduler.shutdown(2)
print(json.dumps(out))
"""


def test_slots_on_a_mesh_equal_one_device(tiny_ckpt):
    """The pool on meshes of 4 host CPU devices (rows over data, KV heads over model): the
    same tokens as one device's generate; the slot count is a multiple of the data axis."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", MESH_CHECK, str(tiny_ckpt)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out) == 9 and all(v == [True, 0] for v in out.values()), out
