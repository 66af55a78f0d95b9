"""The series an ingress replica counts itself (API requests, accepted engine requests, the latency and token-count
histograms), summed over every ingress replica, so a ``/metrics`` scrape answered by any one of them reports the
whole application. No Ray here: the deployment passes in what the other replicas answered.

Each replica exports its own counters and histograms as plain data (:func:`families`); the replica that answers a
scrape keeps the latest export of every other replica it has heard from (never dropped: the values are cumulative,
so a replica that stopped keeps counting in its totals, as with prometheus_client's multiprocess mode) and adds its
own live values. So the totals one replica answers never go down while it lives; two replicas' answers can differ by
what each has not yet heard from the other. Two replicas, one request each::

    a: mixserve:api_requests_total{endpoint="completions",status="200"} 1
    b: mixserve:api_requests_total{endpoint="completions",status="200"} 1
    -> /metrics on either: mixserve:api_requests_total{...} 2

``_created`` samples (when a series started) are left out: a sum of timestamps means nothing. A peer's histogram
whose buckets differ from this replica's (another ``max_model_len`` before a rolling update finished) is left out of
the sum rather than mixed into it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

LIVE_S = 60.0  # a peer not heard of for this long is no longer asked (scaled down, replaced); its counts stay
# (name, type, documentation, [(sample name, labels, value)]): one metric family, as plain data for Ray to carry
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]


def families(registry: CollectorRegistry) -> list[Family]:
    """The registry's families as plain data, without ``_created`` samples."""
    out = []
    for metric in registry.collect():
        samples = [(s.name, dict(s.labels), float(s.value)) for s in metric.samples if not s.name.endswith("_created")]
        out.append((metric.name, metric.type, metric.documentation, samples))
    return out


def buckets(family: Family) -> frozenset[str]:
    """The ``le`` bounds of a histogram family (empty for other kinds)."""
    return frozenset(labels["le"] for sample, labels, _ in family[3] if sample.endswith("_bucket"))


def summed(exports: Iterable[list[Family]]) -> list[Metric]:
    """One family per name over all ``exports``, each sample the sum of the samples with its name and labels (in the
    order first seen). A histogram with other buckets than the first export that has it is skipped."""
    docs: dict[str, tuple[str, str, frozenset[str]]] = {}
    totals: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for export in exports:
        for family in export:
            name, kind, doc, samples = family
            if docs.setdefault(name, (kind, doc, buckets(family)))[2] != buckets(family):
                continue
            into = totals.setdefault(name, {})
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                into[key] = into.get(key, 0.0) + value
    out = []
    for name, (kind, doc, _) in docs.items():
        metric = Metric(name, doc, kind)
        for (sample, labels), value in totals[name].items():
            metric.add_sample(sample, dict(labels), value)
        out.append(metric)
    return out


class IngressTotals:
    """A collector (register it with the registry ``/metrics`` renders): ``own``'s families plus the latest export
    of every other ingress replica, summed."""

    def __init__(self, own: CollectorRegistry, replica: str) -> None:
        self.own = own
        self.replica = replica
        self.peers: dict[str, list[Family]] = {}  # replica id -> its latest export
        self.heard: dict[str, float] = {}  # replica id -> when (monotonic) it last answered

    def update(self, exports: Iterable[tuple[str, list[Family]]]) -> None:
        """Exports ``(replica id, families)`` of ingress replicas; this replica's own is skipped (it is live)."""
        now = time.monotonic()
        for replica, export in exports:
            if replica != self.replica:
                self.peers[replica] = export
                self.heard[replica] = now

    def known(self) -> int:
        """Ingress replicas heard from within :data:`LIVE_S`, itself included (how many to ask at the next
        scrape; one gone longer still counts in the totals)."""
        now = time.monotonic()
        return 1 + sum(1 for when in self.heard.values() if now - when <= LIVE_S)

    def collect(self) -> Iterator[Metric]:
        yield from summed([families(self.own), *self.peers.values()])

    def describe(self) -> list[Any]:
        return []  # names are known only at collect time: keep the registry from collecting at registration
