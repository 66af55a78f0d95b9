"""Prometheus metrics (text exposition at GET /metrics), named, typed, labelled and bucketed like vLLM's
(``vllm:`` -> ``mixserve:``), so vLLM's Grafana dashboards and alerts work with the prefix changed.

Every series has the labels ``model_name`` (the first served model name) and ``engine`` (``"0"``: one engine per
application), as vLLM's do. Latency histograms are measured where the client sees them (the ingress), per engine
request (a choice of an ``n > 1`` request is one); engine figures (running / waiting requests, KV-cache usage,
preemptions, prefix cache, tokens, finished requests by reason) and routed tokens per (layer, expert) come from the
frontend's ``stats()`` at scrape time. mixserve's own: ``mixserve:api_requests_total{endpoint,status}``,
``mixserve:routed_tokens_total{layer,expert}``, ``mixserve:expert_workers_up`` / ``mixserve:expert_workers``,
``mixserve:expert_worker_load_seconds{worker}`` (how long each worker's current incarnation took to load its
experts: the restart cost), ``mixserve:missing_experts`` ((layer, expert) pairs with no live copy) and
``mixserve:expert_failovers_total`` (layers sent again to other copies of their experts after a worker failed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cluster.serve.ingress.health import HealthResponse

log = logging.getLogger("mixserve")

ENGINE = "0"
LABELS = ["model_name", "engine"]
FINISH_REASONS = ("stop", "length", "abort")
# vLLM's bucket sets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class _FrontendCollector:
    """The last frontend snapshot (engine stats, expert load) and worker health as metric families."""

    def __init__(self, model_name: str, max_num_seqs: int) -> None:
        self.labels = [model_name, ENGINE]
        self.max_num_seqs = max_num_seqs
        self.snapshot: dict | None = None
        self.health: HealthResponse | None = None

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        g = GaugeMetricFamily(name, doc, labels=LABELS)
        g.add_metric(self.labels, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        c = CounterMetricFamily(name, doc, labels=LABELS)
        c.add_metric(self.labels, value)
        return c

    def collect(self) -> Iterator[Metric]:
        yield from self._pool()
        snap = self.snapshot
        if snap is None:
            return
        yield self._counter(
            "mixserve:expert_failovers",
            "Layers sent again to other copies of their experts after a worker failed them.",
            snap.get("failovers", 0),
        )
        yield from self._engine(snap.get("engine", {}))
        c = CounterMetricFamily(
            "mixserve:routed_tokens", "Tokens routed to each expert of each layer.", labels=[*LABELS, "layer", "expert"]
        )
        for layer, row in enumerate(snap.get("expert_load", [])):
            for expert, n in enumerate(row):
                c.add_metric([*self.labels, str(layer), str(expert)], n)
        yield c

    def _pool(self) -> Iterator[Metric]:
        """The expert workers, from the latest health check."""
        health = self.health
        if health is None or health.workers is None:
            return
        workers = health.workers
        up = sum(1 for w in workers if w.ok)
        yield self._gauge("mixserve:expert_workers_up", "Expert workers answering a health check.", up)
        yield self._gauge("mixserve:expert_workers", "Expert workers of the application.", len(workers))
        missing = len(health.missing_experts or [])
        yield self._gauge("mixserve:missing_experts", "(layer, expert) pairs with no live copy.", missing)
        g = GaugeMetricFamily(
            "mixserve:expert_worker_load_seconds",
            "Seconds the worker's current process took to load its experts (its restart cost).",
            labels=[*LABELS, "worker"],
        )
        for w in workers:
            if w.load_seconds is not None:
                g.add_metric([*self.labels, str(w.worker)], w.load_seconds)
        yield g

    def _engine(self, eng: dict[str, Any]) -> Iterator[Metric]:
        """The engine's gauges and counters (vLLM's names with the mixserve: prefix)."""
        running = eng.get("running", 0)
        yield self._gauge("mixserve:num_requests_running", "Number of requests in model execution batches.", running)
        yield self._gauge(
            "mixserve:num_requests_waiting", "Number of requests waiting to be processed.", eng.get("waiting", 0)
        )
        usage = eng.get("kv_cache_usage", running / max(1, self.max_num_seqs))
        yield self._gauge("mixserve:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        for name, key, doc in (
            ("mixserve:num_preemptions", "num_preemptions", "Cumulative number of preemption from the engine."),
            (
                "mixserve:prefix_cache_queries",
                "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            (
                "mixserve:prefix_cache_hits",
                "prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
            ("mixserve:prompt_tokens", "prompt_tokens", "Number of prefill tokens processed."),
            ("mixserve:generation_tokens", "generation_tokens", "Number of generation tokens processed."),
        ):
            yield self._counter(name, doc, eng.get(key, 0))
        c = CounterMetricFamily(
            "mixserve:request_success", "Count of successfully processed requests.", labels=[*LABELS, "finished_reason"]
        )
        for reason in FINISH_REASONS:
            c.add_metric([*self.labels, reason], eng.get(f"finished_{reason}", 0))
        yield c


class ServeMetrics:
    def __init__(self, model_name: str, *, max_num_seqs: int) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "mixserve:api_requests",
            "Requests by endpoint and status (gRPC: the HTTP status its code maps to).",
            ["model_name", "endpoint", "status"],
            registry=reg,
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[int]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg).labels(model_name, ENGINE)

        self.ttft = histogram(
            "mixserve:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "mixserve:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "mixserve:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue = histogram(
            "mixserve:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._histogram = histogram
        self._lengths: tuple[Any, Any] | None = None  # per-request token counts; buckets need max_model_len
        self.frontend = _FrontendCollector(model_name, max_num_seqs)
        reg.register(self.frontend)

    def count(self, endpoint: str, status: int) -> None:
        """One finished API request of ``endpoint`` with the HTTP status it got (gRPC: the status it maps to)."""
        self.requests.labels(model_name=self.model_name, endpoint=endpoint, status=str(status)).inc()

    def finished(
        self,
        *,
        e2e_s: float,
        queue_s: float | None,
        prompt_tokens: int,
        generation_tokens: int,
        max_model_len: int | None,
    ) -> None:
        """One engine request finished: its latency, time queued, and token counts."""
        self.e2e.observe(e2e_s)
        if queue_s is not None:
            self.queue.observe(queue_s)
        if self._lengths is None and max_model_len:
            buckets = build_1_2_5_buckets(max_model_len)
            self._lengths = (
                self._histogram("mixserve:request_prompt_tokens", "Number of prefill tokens processed.", buckets),
                self._histogram(
                    "mixserve:request_generation_tokens", "Number of generation tokens processed.", buckets
                ),
            )
        if self._lengths is not None:
            self._lengths[0].observe(prompt_tokens)
            self._lengths[1].observe(generation_tokens)

    def render(self, snapshot: dict | None, health: HealthResponse | None) -> bytes:
        self.frontend.snapshot = snapshot
        self.frontend.health = health
        return generate_latest(self.registry)


async def frontend_snapshot(frontend: Any, timeout_s: float = 5.0) -> dict | None:
    """The frontend's engine stats and expert load; None (logged) when it does not answer, so the ingress's own
    metrics still render."""
    try:
        return await asyncio.wait_for(frontend.stats.remote(), timeout=timeout_s)
    except Exception as e:
        log.warning("metrics: frontend snapshot unavailable (%s); exporting ingress metrics only", e)
        return None
