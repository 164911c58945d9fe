"""`qcache serve` through the real `openai` client, on loopback, on the tiny checkpoint: answers
equal `qcache generate`, concurrency, streaming, the KV budget, bad input (4xx and the server
keeps serving), a full queue (429), disconnects, no leak after 200 requests, SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_cli

openai = pytest.importorskip("openai")

from qcache_jax import load  # noqa: E402
from qcache_jax.serve import server, service  # noqa: E402

PROMPT = "what color is the circle ?"
NAME = "tiny"
BUDGET = 2**20  # 1 MiB: 16 dense slots of 128 tokens of the tiny model


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load(tiny_ckpt)


@contextlib.contextmanager
def running(model, lazy="none", mode=None, **conf):
    """A server in a thread on a free loopback port; yields (service, base URL)."""
    conf = {"kv_budget": BUDGET, "max_model_len": 128, "served_name": NAME, **conf}
    svc = service.build(model, model.resolve_lazy(lazy, mode), service.ServeConfig(**conf))
    sock = server.bind("127.0.0.1", 0)
    srv = server.make_server(svc, shutdown_timeout=5)
    th = threading.Thread(target=server.serve, args=(svc, sock), kwargs={"server": srv}, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield svc, url
    finally:
        srv.should_exit = True
        th.join(30)
        assert not th.is_alive()


@pytest.fixture(scope="module")
def dense(model):
    with running(model) as s:
        yield s


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def image_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(text, *images):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]
             + [{"type": "text", "text": text}]}]


def ask(url, text=PROMPT, *images, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    r = client(url).chat.completions.create(model=NAME, messages=user(text, *images), **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def post(url, body, raw=None):
    """(status, JSON body, headers) of a POST to /v1/chat/completions with any bytes."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def metric(url, name, **labels) -> float:
    """The sum of the samples ``name`` with ``labels`` in /metrics, parsed by prometheus_client
    (asserting the metric family is there)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    assert samples or labels, f"{name} not in /metrics"
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


def test_greedy_equals_qcache_generate(dense, tiny_ckpt, image_path, capsys):
    _, url = dense
    code, out, _ = run_cli(["generate", str(tiny_ckpt), "--prompt", PROMPT, "--image", str(image_path),
                            "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0
    ref = json.loads(out)
    text, finish, usage = ask(url, PROMPT, image_url(image_path))
    assert text == ref["text"]
    assert usage.prompt_tokens == len(ref["prompt_token_ids"]) and usage.completion_tokens == len(ref["token_ids"])
    assert finish == ("stop" if len(ref["token_ids"]) < 8 else "length")
    file_text, _, _ = ask(url, PROMPT, Path(image_path).resolve().as_uri())  # a local file:// path
    assert file_text == ref["text"]


@pytest.mark.parametrize("lazy,mode", [("1-3", "gla"), ("1-2", "vla")])
def test_lazy_server_equals_generate(model, image_path, lazy, mode):
    ref = model.generate(PROMPT, [image_path], lazy=lazy, mode=mode, max_new_tokens=8)
    with running(model, lazy, mode) as (_, url):
        assert ask(url, PROMPT, image_url(image_path))[0] == ref.text[0]


def test_concurrent_equal_sequential_and_stream_equals_plain(dense, image_path):
    _, url = dense
    prompts = [f"{PROMPT} {w}" for w in ("a", "b c", "red", "blue square", "d", "e f g", "h", "green")]
    images = [[image_url(image_path)] if i % 2 == 0 else [] for i in range(8)]
    sequential = [ask(url, p, *im, max_tokens=6 + i) for i, (p, im) in enumerate(zip(prompts, images))]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda a: ask(url, a[1], *a[2], max_tokens=6 + a[0]),
                                   [(i, p, im) for i, (p, im) in enumerate(zip(prompts, images))]))
    assert [c[:2] for c in concurrent] == [s[:2] for s in sequential]
    for i in (0, 3):
        stream = client(url).chat.completions.create(model=NAME, messages=user(prompts[i], *images[i]),
                                                     max_tokens=6 + i, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == sequential[i][0] and finish == [sequential[i][1]]
        assert chunks[-1].usage.completion_tokens == sequential[i][2].completion_tokens


def test_sampling_options_and_stop(dense):
    _, url = dense
    a = ask(url, max_tokens=12, temperature=0.9, top_p=0.9, seed=5)[0]
    assert ask(url, max_tokens=12, temperature=0.9, top_p=0.9, seed=5)[0] == a  # the seed fixes the draw
    full = ask(url, max_tokens=12)[0]
    cut = next(c for c in full[2:] if c.strip())  # a character inside the answer
    text, finish, _ = ask(url, max_tokens=12, stop=[cut])
    assert finish == "stop" and text == full[: full.index(cut)]
    stream = client(url).chat.completions.create(model=NAME, messages=user(PROMPT), max_tokens=12, temperature=0,
                                                 stop=cut, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    # vLLM's ignore_eos: exactly max_tokens (the benchmark's fixed output lengths)
    r = client(url).chat.completions.create(model=NAME, messages=user(PROMPT), max_tokens=40, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


class _ByteTokens:
    """A real ``tokenizers`` ByteFallback decoder (as Llama's): ids 0-255 are bytes, then words."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models

        vocab = {f"<0x{i:02X}>": i for i in range(256)}
        vocab.update({w: 256 + i for i, w in enumerate(("▁a", "▁b", "cd", "▁STOP", "P"))})
        self.tok = Tokenizer(models.WordLevel(vocab, unk_token="<0x00>"))
        self.tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        self.vocab = vocab

    def __call__(self, ids):
        return self.tok.decode(ids)


def test_text_stream_multibyte_and_stop_prefixes(model, rng):
    dec = _ByteTokens()
    v = dec.vocab
    ids = [v["▁a"], *"你".encode(), v["cd"], *"é".encode(), v["▁b"]]
    full = dec(ids)
    assert full == " a你cdé b"
    ts = service.TextStream(dec)
    pieces = [ts.push([i]) for i in ids] + [ts.push([], final=True)]
    assert "".join(pieces) == full and "\ufffd" not in "".join(pieces)
    # the tail that could begin a stop string is held back until it cannot; a stop string that
    # appears cuts the text before it, and nothing of it was ever sent
    ids = [v["▁a"], v["▁STOP"], v["▁b"]]
    ts = service.TextStream(dec, stop=("STOP!",))
    assert [ts.push([i]) for i in ids] == [" a", " ", "STOP b"] and not ts.stopped
    ts = service.TextStream(dec, stop=("P b",))
    assert [ts.push([i]) for i in ids] == [" a", " STO", ""] and ts.stopped
    # the tiny test tokenizer (word-level, spaces between words): incremental == a decode of all ids
    for _ in range(5):
        ids = rng.integers(3, 100, size=30).tolist()
        ts = service.TextStream(model.detokenize)
        assert "".join(ts.push([i]) for i in ids) + ts.push([], final=True) == model.detokenize(ids)


def test_gla_admits_more_slots_under_the_same_budget(model, dense):
    _, url = dense
    with running(model, "1-3", "gla") as (svc, gla_url):
        d, g = metric(url, "qcache_slots_total"), metric(gla_url, "qcache_slots_total")
        assert g > d
        per_dense, per_gla = dense[0].engine.slot_kv_bytes, svc.engine.slot_kv_bytes
        assert d == BUDGET // per_dense and g == BUDGET // per_gla  # from the real pool arrays
        assert svc.engine.pool_kv_bytes <= BUDGET and dense[0].engine.pool_kv_bytes <= BUDGET


@pytest.mark.parametrize("case,status,needle", [
    ("not json", 400, "not valid JSON"),
    ("no messages", 400, "'messages'"),
    ("http image", 400, "not fetched"),
    ("not an image", 400, "not an image"),
    ("missing file", 400, "no such file"),
    ("two images", 400, "at most 1 per request"),
    ("too long", 400, "does not fit a slot"),
    ("bad temperature", 400, "'temperature'"),
    ("tools", 400, "'tools' is not supported"),
    ("other model", 404, "not served here"),
])
def test_bad_input_gets_4xx_and_the_server_keeps_serving(dense, image_path, tmp_path, case, status, needle):
    _, url = dense
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    good = image_url(image_path)
    bodies = {
        "no messages": {"model": NAME},
        "http image": {"messages": user("hi", "http://example.com/cat.png")},
        "not an image": {"messages": user("hi", "data:image/png;base64," + base64.b64encode(b"hello").decode())},
        "missing file": {"messages": user("hi", (tmp_path / "none.png").as_uri())},
        "two images": {"messages": user("hi", good, good)},
        "too long": {"messages": user("word " * 200)},
        "bad temperature": {"messages": user("hi"), "temperature": 7},
        "tools": {"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]},
        "other model": {"model": "gpt-9", "messages": user("hi")},
    }
    code, body, _ = post(url, bodies.get(case), raw=b"{not json" if case == "not json" else None)
    assert code == status and needle in body["error"]["message"] and body["error"]["type"]
    if case == "not an image":  # a real file that is not an image, as a file:// path
        code, body, _ = post(url, {"messages": user("hi", not_image.as_uri())})
        assert code == 400 and "not an image" in body["error"]["message"]
    assert ask(url)[1] in ("stop", "length")  # the next good request is served


def test_queue_full_is_429_with_retry_after(model):
    with running(model, kv_budget=2 * 65536, max_queue=1) as (svc, url):
        slots = svc.engine.layout.slots
        long = {"messages": user(PROMPT), "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        with ThreadPoolExecutor(slots + 1) as pool:
            busy = [pool.submit(post, url, long) for _ in range(slots + 1)]  # every slot, and the queue
            deadline = time.monotonic() + 60
            while svc.scheduler.stats()["queue_length"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            code, body, headers = post(url, long)
            assert code == 429 and "max-queue 1" in body["error"]["message"] and headers.get("Retry-After") == "1"
            assert all(f.result()[0] == 200 for f in busy)
        assert metric(url, "qcache_requests_total", status="429") == 1


def test_disconnect_mid_stream_frees_the_slot(dense):
    """The request ends at the disconnect, long before its 100 tokens."""
    svc, url = dense
    tokens_before = metric(url, "qcache_generated_tokens_total")
    stream = client(url).chat.completions.create(model=NAME, messages=user(PROMPT), max_tokens=100, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # the role chunk
    next(chunks)  # the first token's
    assert svc.scheduler.stats()["slots_active"] == 1
    stream.close()  # the client goes away
    deadline = time.monotonic() + 30
    while svc.scheduler.stats()["slots_active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert svc.scheduler.stats()["slots_active"] == 0
    assert metric(url, "qcache_generated_tokens_total") - tokens_before < 90


def test_200_requests_leave_nothing_behind(model, image_path):
    import jax

    with running(model, kv_budget=4 * 65536) as (svc, url):
        img = image_url(image_path)

        def one(i):
            return ask(url, f"{PROMPT} {i}", *([img] if i % 3 == 0 else []), max_tokens=1 + i % 7)[1]

        one(0), one(1)
        before = (len(jax.live_arrays()), sum(a.nbytes for a in jax.live_arrays()))
        with ThreadPoolExecutor(12) as pool:
            finishes = list(pool.map(one, range(200)))
        assert all(f in ("stop", "length") for f in finishes)
        stats = svc.scheduler.stats()
        assert stats["slots_active"] == 0 and stats["queue_length"] == 0 and stats["kv_bytes_in_use"] == 0
        assert metric(url, "qcache_slots_active") == 0 and metric(url, "qcache_kv_bytes_in_use") == 0
        assert not svc.scheduler._running and sorted(svc.scheduler._free) == list(range(svc.engine.layout.slots))
        after = (len(jax.live_arrays()), sum(a.nbytes for a in jax.live_arrays()))
        assert after == before  # no device array kept per request
        assert metric(url, "qcache_requests_total", status="200") == 202
        assert metric(url, "qcache_decode_steps_total") > 0 and metric(url, "qcache_prefill_seconds_total") > 0
        assert metric(url, "qcache_generated_tokens_total") == metric(url, "qcache_time_to_first_token_seconds_count") \
            + metric(url, "qcache_time_per_output_token_seconds_count")


def test_sigterm_stops_accepting_finishes_and_exits_0(tiny_ckpt, tmp_path):
    """`qcache serve` as users run it: the start-up line names the port; SIGTERM while a long
    streamed request runs: the stream ends (finished or aborted), the process exits 0 in time."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "qcache_jax.cli", "serve", str(tiny_ckpt), "--port", "0",
                             "--max-model-len", "512", "--kv-budget", "1MiB", "--shutdown-timeout", "3",
                             "--served-model-name", NAME], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, lines = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            url = m.group(1) if m else None
            assert line or proc.poll() is None, "".join(lines)
        assert url, "".join(lines)
        assert "slots of 512 tokens" in "".join(lines)
        assert ask(url)[1] in ("stop", "length")
        stream = client(url).chat.completions.create(model=NAME, messages=user(PROMPT), max_tokens=400,
                                                     temperature=0, stream=True)
        it = iter(stream)
        next(it)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = []
        with contextlib.suppress(openai.APIError):  # an aborted stream ends with an error event
            rest = list(it)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 3 + 15  # the shutdown timeout, and the exit
        assert all(c.choices == [] or c.choices[0].finish_reason in (None, "length", "stop") for c in rest)
        with pytest.raises(openai.APIConnectionError):
            ask(url)  # no longer accepting
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
