"""Prometheus metrics of one server, in a registry of its own (no process-global state: two
servers in one process, as in the tests, keep separate counts). Names as
``../shared/design/interface.md`` lists them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# Seconds; first tokens include prefill (and a compilation for a new prompt size).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _SchedulerCounters:
    """Counters the scheduler keeps itself (read at scrape time): where its time went."""

    DOCS = {
        "prefill_seconds": "Seconds the scheduler spent prefilling admitted requests",
        "decode_seconds": "Seconds the scheduler spent in decode steps",
        "decode_steps": "Decode steps run (each advances every active slot by one token)",
    }

    def __init__(self, stats):
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, doc in self.DOCS.items():
            yield CounterMetricFamily(f"qcache_{name}", doc, value=s[name])


class Metrics:
    """The server's gauges (read from ``stats()``, a callable returning the scheduler's
    :meth:`~qcache_jax.runtime.scheduler.Scheduler.stats`), counters and histograms."""

    def __init__(self, stats):
        self.registry = r = CollectorRegistry()
        self._stats = stats
        for name, doc in (
            ("slots_total", "Sequence slots the KV budget holds under the server's schedule"),
            ("slots_active", "Slots holding a running request"),
            ("queue_length", "Requests waiting for a slot"),
            ("kv_bytes_in_use", "KV-cache bytes of the slots holding a running request"),
        ):
            Gauge(f"qcache_{name}", doc, registry=r).set_function(lambda n=name: self._stats()[n])
        r.register(_SchedulerCounters(stats))
        self.requests = Counter("qcache_requests", "Requests answered, by HTTP status and finish reason",
                                ("status", "finish_reason"), registry=r)
        self.generated = Counter("qcache_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qcache_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("qcache_time_per_output_token_seconds", "Between two generated tokens of a request",
                              buckets=TPOT_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
