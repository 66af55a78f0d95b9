"""A /metrics scrape answered by one ingress replica reports what every ingress replica counted: the API requests,
the engine requests accepted per frontend and the latency / token-count histograms are summed over the replicas'
exports (parsed back with prometheus_client's own parser), a replica's own counts stay live, and a replica that
stopped answering still counts."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.serve.ingress.metrics import ServeMetrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float | None:
    want = tuple(sorted({"model_name": "m", **labels}.items()))
    return samples(text).get((name, want))


def replica(name: str, completions: int, ttft: list[float], engine: str) -> ServeMetrics:
    m = ServeMetrics("m", max_num_seqs=4, replica=name)
    for _ in range(completions):
        m.count("completions", 200)
        m.accepted(engine)
    for t in ttft:
        m.ttft.observe(t)
    return m


def test_a_scrape_sums_every_ingress_replicas_counts():
    a = replica("a", 3, [0.004, 0.3], engine="f1")
    b = replica("b", 2, [0.03], engine="f2")
    b.finished(e2e_s=2.0, queue_s=None, prompt_tokens=6, generation_tokens=9, max_model_len=64)  # only b has these
    alone = a.render([], None)
    assert value(alone, "mixserve:api_requests_total", endpoint="completions", status="200") == 3.0
    text = a.render([], None, [b.export(), a.export()])  # its own export is skipped: it counts itself live
    assert value(text, "mixserve:api_requests_total", endpoint="completions", status="200") == 5.0
    assert value(text, "mixserve:frontend_requests_total", engine="f1") == 3.0
    assert value(text, "mixserve:frontend_requests_total", engine="f2") == 2.0
    ttft = "mixserve:time_to_first_token_seconds"
    assert value(text, f"{ttft}_count", engine="0") == 3.0
    assert value(text, f"{ttft}_sum", engine="0") == 0.004 + 0.3 + 0.03
    assert value(text, f"{ttft}_bucket", engine="0", le="0.005") == 1.0
    assert value(text, f"{ttft}_bucket", engine="0", le="0.04") == 2.0
    assert value(text, f"{ttft}_bucket", engine="0", le="+Inf") == 3.0
    assert value(text, "mixserve:request_generation_tokens_sum", engine="0") == 9.0  # a family only b has
    assert not [k for k in samples(text) if k[0].endswith("_created")]


def test_own_counts_stay_live_and_a_silent_replica_keeps_counting():
    a, b = replica("a", 1, [], engine="f1"), replica("b", 4, [], engine="f1")
    a.render([], None, [b.export()])
    a.count("completions", 200)  # a's own: live
    b.count("completions", 200)  # b's later count: not heard of yet
    text = a.render([], None)  # b does not answer this scrape: its last export still counts
    assert value(text, "mixserve:api_requests_total", endpoint="completions", status="200") == 2.0 + 4.0
    assert a.known_ingresses() == 2
    text = a.render([], None, [b.export()])
    assert value(text, "mixserve:api_requests_total", endpoint="completions", status="200") == 2.0 + 5.0


def test_a_peer_histogram_with_other_buckets_is_left_out_not_mixed_in():
    """During a rolling update that changed max_model_len, the token-count histograms of old and new replicas have
    other buckets: the answering replica sums only those with its own."""
    a, b = replica("a", 0, [], engine="f1"), replica("b", 0, [], engine="f1")
    a.finished(e2e_s=1.0, queue_s=None, prompt_tokens=3, generation_tokens=4, max_model_len=100)
    b.finished(e2e_s=1.0, queue_s=None, prompt_tokens=30, generation_tokens=40, max_model_len=1000)
    text = a.render([], None, [b.export()])
    assert value(text, "mixserve:request_prompt_tokens_sum", engine="0") == 3.0  # b's other buckets: not summed
    assert value(text, "mixserve:request_prompt_tokens_bucket", engine="0", le="1000.0") is None
    assert value(text, "mixserve:e2e_request_latency_seconds_count", engine="0") == 2.0  # same buckets: summed


def test_a_peer_not_heard_of_for_a_minute_is_no_longer_asked_but_still_counts(monkeypatch):
    import cluster.serve.ingress.ingress_totals as totals

    now = [1000.0]
    monkeypatch.setattr(totals.time, "monotonic", lambda: now[0])
    a, b = replica("a", 1, [], engine="f1"), replica("b", 2, [], engine="f1")
    a.render([], None, [b.export()])
    assert a.known_ingresses() == 2
    now[0] += totals.LIVE_S + 1
    assert a.known_ingresses() == 1
    text = a.render([], None)
    assert value(text, "mixserve:api_requests_total", endpoint="completions", status="200") == 3.0
