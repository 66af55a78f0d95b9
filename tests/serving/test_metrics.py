"""GET /metrics scraped and parsed with prometheus_client's own parser: vLLM's names (``mixserve:`` prefix), types,
labels and bucket sets, plus mixserve's routing and worker metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.serve.ingress.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, build_1_2_5_buckets
from tests.serving.helpers import MODEL_NAME, post

pytestmark = [pytest.mark.ray, pytest.mark.serving]

# vLLM's (vllm/v1/metrics/loggers.py), prefix changed: name -> (type, labels besides model_name and engine)
VLLM_LIKE = {
    "mixserve:num_requests_running": ("gauge", set()),
    "mixserve:num_requests_waiting": ("gauge", set()),
    "mixserve:kv_cache_usage_perc": ("gauge", set()),
    "mixserve:num_preemptions": ("counter", set()),
    "mixserve:prefix_cache_queries": ("counter", set()),
    "mixserve:prefix_cache_hits": ("counter", set()),
    "mixserve:prompt_tokens": ("counter", set()),
    "mixserve:generation_tokens": ("counter", set()),
    "mixserve:request_success": ("counter", {"finished_reason"}),
    "mixserve:time_to_first_token_seconds": ("histogram", set()),
    "mixserve:inter_token_latency_seconds": ("histogram", set()),
    "mixserve:e2e_request_latency_seconds": ("histogram", set()),
    "mixserve:request_queue_time_seconds": ("histogram", set()),
    "mixserve:request_prompt_tokens": ("histogram", set()),
    "mixserve:request_generation_tokens": ("histogram", set()),
}
OURS = {
    "mixserve:routed_tokens": ("counter", {"layer", "expert"}),
    "mixserve:expert_workers_up": ("gauge", set()),
    "mixserve:expert_workers": ("gauge", set()),
    "mixserve:missing_experts": ("gauge", set()),
    "mixserve:expert_worker_load_seconds": ("gauge", {"worker"}),
    "mixserve:expert_failovers": ("counter", set()),
    "mixserve:api_requests": ("counter", {"endpoint", "status"}),
}
BUCKETS = {
    "mixserve:time_to_first_token_seconds": TTFT_BUCKETS,
    "mixserve:inter_token_latency_seconds": ITL_BUCKETS,
    "mixserve:e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "mixserve:request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
    "mixserve:request_prompt_tokens": build_1_2_5_buckets(4096),
}


def scrape(base: str) -> dict:
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_metrics_parse_with_vllm_names_types_labels_and_buckets(served):
    base, _, _ = served
    for body in ({"prompt": "metrics", "max_tokens": 5, "temperature": 0},
                 {"prompt": "stream", "max_tokens": 3, "stream": True}):  # fmt: skip
        r = post(base, "/v1/completions", body)
        assert r.status_code == 200, r.text
    families = scrape(base)
    # engine: "0" for the ingress's own series (one per application, as vLLM's one engine), the frontend replica's
    # id (the last part of the name /health reports) for the series each frontend replica reports
    frontend = httpx.get(f"{base}/health", timeout=30).json()["frontend"].rsplit("#", 1)[-1]
    for name, (kind, extra) in {**VLLM_LIKE, **OURS}.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, name
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            expected = {"model_name", *extra} | (set() if name == "mixserve:api_requests" else {"engine"})
            assert labels == expected, (name, sample.labels)
            assert sample.labels["model_name"] == MODEL_NAME
            if "engine" in sample.labels:
                assert sample.labels["engine"] in ("0", frontend), (name, sample.labels)
    assert {s.labels["engine"] for s in families["mixserve:num_requests_running"].samples} == {frontend}
    assert {s.labels["engine"] for s in families["mixserve:time_to_first_token_seconds"].samples} == {"0"}
    for name, buckets in BUCKETS.items():
        bounds = [float(s.labels["le"]) for s in families[name].samples if s.name == name + "_bucket"]
        assert bounds == [*map(float, buckets), float("inf")], name


def test_metric_values_follow_the_requests(served):
    base, _, _ = served
    before = scrape(base)

    def value(families, name, sample_name, **labels):
        return sum(
            s.value
            for s in families[name].samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    body = {"prompt": [1, 330, 1000], "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    assert post(base, "/v1/completions", body).status_code == 200
    after = scrape(base)
    assert (
        value(after, "mixserve:generation_tokens", "mixserve:generation_tokens_total")
        >= value(before, "mixserve:generation_tokens", "mixserve:generation_tokens_total") + 7
    )
    success = ("mixserve:request_success", "mixserve:request_success_total")
    assert value(after, *success, finished_reason="length") >= value(before, *success, finished_reason="length") + 1
    for name in ("mixserve:e2e_request_latency_seconds", "mixserve:time_to_first_token_seconds",
                 "mixserve:request_prompt_tokens"):  # fmt: skip
        assert value(after, name, name + "_count") >= value(before, name, name + "_count") + 1, name
    itl = "mixserve:inter_token_latency_seconds"
    assert value(after, itl, itl + "_count") >= value(before, itl, itl + "_count") + 6
    api = ("mixserve:api_requests", "mixserve:api_requests_total")
    assert (
        value(after, *api, endpoint="completions", status="200")
        == value(before, *api, endpoint="completions", status="200") + 1
    )
    routed = value(after, "mixserve:routed_tokens", "mixserve:routed_tokens_total", layer="1")
    assert routed > value(before, "mixserve:routed_tokens", "mixserve:routed_tokens_total", layer="1")
    assert value(after, "mixserve:expert_workers_up", "mixserve:expert_workers_up") == 2
    assert value(after, "mixserve:missing_experts", "mixserve:missing_experts") == 0
    loads = [s for s in after["mixserve:expert_worker_load_seconds"].samples]
    assert sorted(s.labels["worker"] for s in loads) == ["0", "1"]
    assert all(0 < s.value < 120 for s in loads), loads
    usage = value(after, "mixserve:kv_cache_usage_perc", "mixserve:kv_cache_usage_perc")
    assert 0 <= usage <= 1
    assert value(after, "mixserve:num_requests_running", "mixserve:num_requests_running") >= 0
