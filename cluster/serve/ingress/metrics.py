"""Prometheus metrics (text exposition at GET /metrics), named, typed, labelled and bucketed like vLLM's
(``vllm:`` -> ``mixserve:``), so vLLM's Grafana dashboards and alerts work with the prefix changed.

Every series but ``mixserve:api_requests_total`` has the labels ``model_name`` (the first served model name) and
``engine``, as vLLM's do. ``engine`` names a frontend replica (each runs its own engine) by the last part of its Serve
replica id (:func:`engine_label`; ``"0"`` for a snapshot that names no replica) on the per-frontend series: the engine
figures (running / waiting requests, KV-cache usage, preemptions, prefix cache, tokens, finished pooling requests,
finished requests by reason), routed tokens per (layer, expert), failovers and hedges, from each replica's ``stats()``
at scrape time (a replica not heard of for ``STALE_SNAPSHOT_S`` is left out), and ``mixserve:frontend_requests_total``
(engine requests each replica accepted, counted by the ingress). It is ``"0"`` on the ingress's latency and token-count
histograms (measured where the client sees them, per engine request: a choice of an ``n > 1`` request is one; not split
by replica) and on the series of the expert pool and its workers, which every frontend shares. What the ingress counts
(API requests, accepted engine requests, those histograms) is summed over every ingress replica the answering one has
heard from (:mod:`cluster.serve.ingress.ingress_totals`).
mixserve's own: ``mixserve:api_requests_total{endpoint,status}``, ``mixserve:frontend_requests_total``,
``mixserve:routed_tokens_total{layer,expert}``, ``mixserve:expert_workers_up`` / ``mixserve:expert_workers``,
``mixserve:expert_worker_load_seconds{worker}`` (how long each worker's current incarnation took to load its
experts: the restart cost), ``mixserve:missing_experts`` ((layer, expert) pairs with no live copy),
``mixserve:expert_failovers_total`` (layers sent again to other copies of their experts after a worker failed),
``mixserve:expert_hedges_total`` (layers sent to other copies because a worker answered late) and the workers'
merged expert runs (``mixserve:expert_rows_per_call{worker}``, ``mixserve:expert_rows_total{worker}``,
``mixserve:expert_matmuls_total{worker}``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from cluster.serve.ingress.health import HealthResponse, WorkerHealth
from cluster.serve.ingress.ingress_totals import Family, IngressTotals, families

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


# Engine counters and gauges per frontend replica: (metric, snapshot key, kind, help), vLLM's names and help
ENGINE_SERIES = (
    ("mixserve:num_requests_running", "running", "gauge", "Number of requests in model execution batches."),
    ("mixserve:num_requests_waiting", "waiting", "gauge", "Number of requests waiting to be processed."),
    ("mixserve:kv_cache_usage_perc", "kv_cache_usage", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("mixserve:num_preemptions", "num_preemptions", "counter", "Cumulative number of preemption from the engine."),
    ("mixserve:prefix_cache_queries", "prefix_cache_queries", "counter",
     "Prefix cache queries, in terms of number of queried tokens."),
    ("mixserve:prefix_cache_hits", "prefix_cache_hits", "counter",
     "Prefix cache hits, in terms of number of cached tokens."),
    ("mixserve:prompt_tokens", "prompt_tokens", "counter", "Number of prefill tokens processed."),
    ("mixserve:generation_tokens", "generation_tokens", "counter", "Number of generation tokens processed."),
    ("mixserve:pooling_requests", "pooling_requests", "counter",
     "Number of pooling requests (embed, classify, score) finished."),
)  # fmt: skip
STALE_SNAPSHOT_S = 60.0  # a frontend not heard of for this long is left out (gone, or scaled down)


class _FrontendCollector:
    """The latest snapshot of each frontend replica (engine stats, expert load, failovers; ``engine`` label: the
    replica) and the expert workers' health (load time, what their mergers ran) as metric families."""

    def __init__(self, model_name: str, max_num_seqs: int) -> None:
        self.model_name = model_name
        self.max_num_seqs = max_num_seqs
        self.snapshots: dict[str, tuple[float, dict]] = {}  # engine label -> (monotonic time, snapshot)
        self.health: HealthResponse | None = None

    def update(self, snapshots: list[dict]) -> None:
        now = time.monotonic()
        for snap in snapshots:
            self.snapshots[engine_label(snap)] = (now, snap)
        for engine, (when, _) in list(self.snapshots.items()):
            if now - when > STALE_SNAPSHOT_S:
                del self.snapshots[engine]

    def _family(self, name: str, kind: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
        cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        return cls(name, doc, labels=[*LABELS, *extra])

    def collect(self) -> Iterator[Metric]:
        yield from self._pool()
        if not self.snapshots:
            return
        frontends = sorted((engine, snap) for engine, (_, snap) in self.snapshots.items())
        for name, key, kind, doc in ENGINE_SERIES:
            f = self._family(name, kind, doc)
            for engine, snap in frontends:
                eng = snap.get("engine", {})
                default = eng.get("running", 0) / max(1, self.max_num_seqs) if key == "kv_cache_usage" else 0
                f.add_metric([self.model_name, engine], eng.get(key, default))
            yield f
        done = self._family("mixserve:request_success", "counter", "Count of successfully processed requests.",
                            ("finished_reason",))  # fmt: skip
        failovers = self._family(
            "mixserve:expert_failovers", "counter", "Layers sent again to other copies after a worker failed them."
        )
        hedges = self._family(
            "mixserve:expert_hedges", "counter", "Layers sent to other copies because a worker answered late."
        )
        routed = self._family("mixserve:routed_tokens", "counter", "Tokens routed to each expert of each layer.",
                              ("layer", "expert"))  # fmt: skip
        for engine, snap in frontends:
            labels = [self.model_name, engine]
            for reason in FINISH_REASONS:
                done.add_metric([*labels, reason], snap.get("engine", {}).get(f"finished_{reason}", 0))
            failovers.add_metric(labels, snap.get("failovers", 0))
            hedges.add_metric(labels, snap.get("hedges", 0))
            for layer, row in enumerate(snap.get("expert_load", [])):
                for expert, n in enumerate(row):
                    routed.add_metric([*labels, str(layer), str(expert)], n)
        yield from (done, failovers, hedges, routed)

    def _pool(self) -> Iterator[Metric]:
        """The expert workers, from the latest health check (every frontend sees the same pool)."""
        health = self.health
        if health is None or health.workers is None:
            return
        labels = [self.model_name, ENGINE]
        workers = health.workers
        for name, doc, value in (
            ("mixserve:expert_workers_up", "Expert workers answering a health check.", sum(w.ok for w in workers)),
            ("mixserve:expert_workers", "Expert workers of the application.", len(workers)),
            ("mixserve:missing_experts", "(layer, expert) pairs with no live copy.", len(health.missing_experts or [])),
        ):
            g = self._family(name, "gauge", doc)
            g.add_metric(labels, value)
            yield g
        load = self._family("mixserve:expert_worker_load_seconds", "gauge",
                            "Seconds the worker's current process took to load its experts (its restart cost).",
                            ("worker",))  # fmt: skip
        for w in workers:
            if w.load_seconds is not None:
                load.add_metric([*labels, str(w.worker)], w.load_seconds)
        yield load
        yield from merge_families(labels, workers)


def merge_families(labels: list[str], workers: list[WorkerHealth]) -> Iterator[Metric]:
    """What each worker's merger ran (``workers.merge``): rows per run as a histogram, and rows and expert matmuls
    as counters (rows / matmuls = rows per expert matmul: above 1 frontend's share when frontends' layers merge)."""
    hist = HistogramMetricFamily(
        "mixserve:expert_rows_per_call",
        "Rows (token x expert assignments) per expert run of a worker, its frontends' messages merged.",
        labels=[*LABELS, "worker"],
    )
    rows = CounterMetricFamily("mixserve:expert_rows", "Token x expert assignments an expert worker computed.",
                               labels=[*LABELS, "worker"])  # fmt: skip
    calls = CounterMetricFamily("mixserve:expert_matmuls", "Expert matmuls (distinct experts per run) of a worker.",
                                labels=[*LABELS, "worker"])  # fmt: skip
    for w in workers:
        m = w.merge
        if not m:
            continue
        cumulative, buckets = 0, []
        for bound, n in zip([*m["rows_buckets"], "+Inf"], m["rows_per_run"], strict=True):
            cumulative += n
            buckets.append((str(bound), cumulative))
        hist.add_metric([*labels, str(w.worker)], buckets, sum_value=m["rows"])
        rows.add_metric([*labels, str(w.worker)], m["rows"])
        calls.add_metric([*labels, str(w.worker)], m["expert_calls"])
    yield from (hist, rows, calls)


def engine_label(snapshot: dict) -> str:
    """The ``engine`` label of a frontend replica's snapshot: the last part of its replica id ("0" without one)."""
    return str(snapshot.get("frontend") or ENGINE).rsplit("#", 1)[-1]


class ServeMetrics:
    """One ingress replica's metrics. ``own``: what this replica counts (API requests, accepted engine requests,
    latency and token-count histograms); ``registry``: what ``/metrics`` renders, those summed over every ingress
    replica heard from (``cluster.serve.ingress.ingress_totals``) and the frontends' and workers' series."""

    def __init__(self, model_name: str, *, max_num_seqs: int, replica: str = "local") -> None:
        self.model_name = model_name
        self.own = CollectorRegistry()
        reg = self.own
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
        self.frontend_requests = Counter(
            "mixserve:frontend_requests",
            "Engine requests each frontend replica accepted (engine: the replica).",
            LABELS,
            registry=reg,
        )
        self.ingresses = IngressTotals(reg, replica)
        self.frontend = _FrontendCollector(model_name, max_num_seqs)
        self.registry = CollectorRegistry()
        self.registry.register(self.ingresses)
        self.registry.register(self.frontend)

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

    def accepted(self, engine: str) -> None:
        """One engine request accepted by the frontend replica ``engine``."""
        self.frontend_requests.labels(model_name=self.model_name, engine=engine).inc()

    def export(self) -> tuple[str, list[Family]]:
        """(this replica's id, its own families as plain data): what another ingress replica sums into its scrape."""
        return self.ingresses.replica, families(self.own)

    def render(
        self, snapshots: list[dict], health: HealthResponse | None, ingresses: Sequence[tuple[str, list[Family]]] = ()
    ) -> bytes:
        """The exposition text: frontend ``snapshots``, the pool's ``health``, and the other ingress replicas'
        exports (:meth:`export`) summed with this one's counts."""
        self.frontend.update(snapshots)
        self.frontend.health = health
        self.ingresses.update(ingresses)
        return generate_latest(self.registry)

    def known_frontends(self) -> int:
        return len(self.frontend.snapshots)

    def known_ingresses(self) -> int:
        return self.ingresses.known()


async def frontend_snapshots(frontend: Any, asks: int, timeout_s: float = 5.0) -> list[dict]:
    """Engine stats and expert load of frontend replicas: ``asks`` calls at once, which the handle spreads over the
    replicas (each snapshot names its replica); the ones that do not answer are left out (logged), so the ingress's
    own metrics still render."""
    return await _answers(lambda: frontend.stats.remote(), asks, timeout_s, "a frontend snapshot")


async def ingress_exports(ingress: Any, asks: int, timeout_s: float = 2.0) -> list[tuple[str, list[Family]]]:
    """The other ingress replicas' own counts (``ServeMetrics.export``), asked as :func:`frontend_snapshots` asks
    the frontends, through a handle to the ingress deployment itself."""
    return await _answers(lambda: ingress.metrics_export.remote(), asks, timeout_s, "an ingress replica's counts")


async def _answers(call: Callable[[], Any], asks: int, timeout_s: float, what: str) -> list[Any]:
    async def one() -> Any:
        try:
            return await asyncio.wait_for(call(), timeout=timeout_s)
        except Exception as e:
            log.warning("metrics: %s is unavailable (%s)", what, e)
            return None

    return [s for s in await asyncio.gather(*(one() for _ in range(asks))) if s is not None]
