"""Prometheus metrics with vLLM-style names, in a registry owned by one app (no process globals, so
several apps can live in one process).

Engine-wide state (running/waiting, KV usage, preemptions, prefix-cache counters, token totals) is read
from `engine.stats()` at scrape time. Per-request latencies are observed as requests finish: TTFT and
end-to-end from the engine's `RequestMetrics`; inter-token latency here, as each output arrives, which
is the gap a streaming client sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tessera.specs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Any], labels: dict[str, str]) -> None:
        self.stats = stats
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        names, values = list(self.labels), list(self.labels.values())
        gauges = (("tessera:num_requests_running", "Requests running on the engine", s.num_running),
                  ("tessera:num_requests_waiting", "Requests waiting for the engine", s.num_waiting),
                  ("tessera:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)", s.kv_usage))
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, float(value))
            yield g
        counters = (("tessera:num_preemptions", "Sequences preempted", s.num_preemptions),
                    ("tessera:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     s.prefix_cache_queries),
                    ("tessera:prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits),
                    ("tessera:prompt_tokens", "Prompt tokens processed", s.prompt_tokens_total),
                    ("tessera:generation_tokens", "Tokens generated", s.generation_tokens_total))
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, float(value))
            yield c


class GatewayMetrics:
    """The app's metrics; `render()` is the /metrics body."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, stats: Callable[[], Any], model_name: str,
                 queue: Callable[[], tuple[int, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = {"model_name": model_name}
        self.registry.register(_EngineCollector(stats, labels))
        lab = ["model_name"]
        self.ttft = Histogram("tessera:time_to_first_token_seconds", "Time to first token", lab,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("tessera:inter_token_latency_seconds", "Time between successive output tokens",
                             lab, buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("tessera:e2e_request_latency_seconds", "Arrival to finish of each request", lab,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.success = Counter("tessera:request_success", "Requests finished, by finish reason",
                               [*lab, "finished_reason"], registry=self.registry)
        self.rejected = Counter("tessera:request_rejected", "Requests refused before reaching the engine",
                                [*lab, "status"], registry=self.registry)
        self.aborted = Counter("tessera:request_aborted", "Requests aborted (client gone or timed out)",
                               [*lab, "reason"], registry=self.registry)
        self._queue = queue
        seqs = Gauge("tessera:gateway_queue_sequences", "Sequences admitted and not yet finished", lab,
                     registry=self.registry)
        toks = Gauge("tessera:gateway_queue_tokens", "Token budget admitted and not yet finished", lab,
                     registry=self.registry)
        seqs.labels(model_name).set_function(lambda: self._queue()[0])
        toks.labels(model_name).set_function(lambda: self._queue()[1])

    def observe_tokens(self, gap_s: float, new_tokens: int) -> None:
        """`new_tokens` arrived `gap_s` after the previous output: each counts as one inter-token gap."""
        per = gap_s / new_tokens
        for _ in range(new_tokens):
            self.itl.observe(per)

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.success.labels(self.model_name, reason or "unknown").inc()
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))

    def reject(self, status: int) -> None:
        self.rejected.labels(self.model_name, str(status)).inc()

    def abort(self, reason: str) -> None:
        self.aborted.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
