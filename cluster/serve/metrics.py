"""Prometheus metrics of the serving layer (text exposition at GET /metrics).

Request counts and latency histograms are measured where the client sees them (the ingress); queue depth,
token counts and routed tokens per (layer, expert) come from the frontend at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("mixserve")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _FrontendCollector:
    """Turns the last frontend snapshot into metric families."""

    def __init__(self) -> None:
        self.snapshot: dict | None = None

    def collect(self):
        snap = self.snapshot
        if snap is None:
            return
        eng = snap["engine"]
        g = GaugeMetricFamily("mixserve_running_requests", "Requests decoding in the running batch")
        g.add_metric([], eng.get("running", 0))
        yield g
        g = GaugeMetricFamily("mixserve_waiting_requests", "Requests queued for a KV-cache slot")
        g.add_metric([], eng.get("waiting", 0))
        yield g
        c = CounterMetricFamily("mixserve_prompt_tokens", "Prompt tokens processed")
        c.add_metric([], eng.get("prompt_tokens", 0))
        yield c
        c = CounterMetricFamily("mixserve_generation_tokens", "Tokens generated")
        c.add_metric([], eng.get("generation_tokens", 0))
        yield c
        c = CounterMetricFamily(
            "mixserve_routed_tokens", "Tokens routed to each expert of each layer", labels=["layer", "expert"]
        )
        for layer, row in enumerate(snap.get("expert_load", [])):
            for expert, n in enumerate(row):
                c.add_metric([str(layer), str(expert)], n)
        yield c
        g = GaugeMetricFamily("mixserve_expert_workers_up", "Expert workers answering a health ping")
        g.add_metric([], snap.get("workers_up", 0))
        yield g


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mixserve_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "mixserve_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "mixserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "mixserve_request_latency_seconds",
            "Time from request arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.frontend = _FrontendCollector()
        self.registry.register(self.frontend)

    def count(self, endpoint: str, status: int) -> None:
        """One finished request of ``endpoint`` with the HTTP status it got (gRPC: the status it maps to)."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self, snapshot: dict | None) -> bytes:
        self.frontend.snapshot = snapshot
        return generate_latest(self.registry)


async def frontend_snapshot(frontend: Any) -> dict | None:
    """The frontend's engine counters, expert load and workers up; None (logged) when it does not answer, so the
    request metrics still render."""
    try:
        snapshot = await asyncio.wait_for(frontend.stats.remote(), timeout=10)
        health = await asyncio.wait_for(frontend.health.remote(timeout_s=1.0), timeout=10)
    except Exception as e:
        log.warning("metrics: frontend snapshot unavailable (%s); exporting ingress metrics only", e)
        return None
    snapshot["workers_up"] = sum(1 for w in health["workers"] if w["ok"])
    return snapshot
