"""The monitoring files: every query of the Grafana dashboard (deploy/grafana/mixserve.json) names series and labels
that mixserve's /metrics really exports (rendered here from cluster.serve.ingress.metrics and parsed with
prometheus_client's parser), and the PodMonitor (deploy/kuberay/podmonitor.yaml) selects the RayService's head pod on a
port it has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.serve.ingress.health import HealthResponse, WorkerHealth
from cluster.serve.ingress.metrics import ServeMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "mixserve.json"
PODMONITOR = REPO / "deploy" / "kuberay" / "podmonitor.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"
SERIES = re.compile(r"mixserve:[a-z0-9_]+")


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from a rendering with every family present."""
    m = ServeMetrics("m", max_num_seqs=4)
    m.count("completions", 200)
    for observe in (m.ttft, m.itl):
        observe.observe(0.1)
    m.finished(e2e_s=1.0, queue_s=0.1, prompt_tokens=5, generation_tokens=7, max_model_len=4096)
    engine = {"running": 1, "waiting": 0, "kv_cache_usage": 0.5, "num_preemptions": 0, "prefix_cache_queries": 3,
              "prefix_cache_hits": 1, "prompt_tokens": 5, "generation_tokens": 7, "finished_stop": 1}  # fmt: skip
    merge = {"runs": 3, "messages": 4, "rows": 20, "expert_calls": 5, "merged_runs": 1,
             "rows_buckets": [1, 8, 64], "rows_per_run": [0, 2, 1, 0]}  # fmt: skip
    health = HealthResponse(
        status="ok", workers=[WorkerHealth(worker=0, ok=True, load_seconds=1.5, pid=7, merge=merge)]
    )
    m.accepted("abc")
    snap = {"engine": engine, "expert_load": [[1, 2], [3, 4]], "failovers": 0, "hedges": 0, "frontend": "a#b#abc"}
    text = m.render([snap], health).decode()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_queries_name_exported_series_and_labels():
    dashboard = json.loads(DASHBOARD.read_text())
    series = exported()
    seen = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            names = SERIES.findall(expr)
            assert names, (panel["title"], expr)
            for name in names:
                assert name in series, (panel["title"], name)
                assert "model_name" in series[name], name
                seen.add(name)
            for group in re.findall(r"by \(([^)]*)\)", expr):
                for label in (g.strip() for g in group.split(",")):
                    assert any(label in series[n] for n in names), (panel["title"], label)
    # the panels the issue asks for: latency, throughput, KV usage, and the layer x expert routing heatmap
    for needed in ("mixserve:time_to_first_token_seconds_bucket", "mixserve:inter_token_latency_seconds_bucket",
                   "mixserve:e2e_request_latency_seconds_bucket", "mixserve:generation_tokens_total",
                   "mixserve:kv_cache_usage_perc", "mixserve:routed_tokens_total"):  # fmt: skip
        assert needed in seen, needed
    heatmaps = [p for p in panels(dashboard) if p["type"] == "heatmap" and "routed_tokens" in json.dumps(p)]
    assert heatmaps and "layer, expert" in heatmaps[0]["targets"][0]["expr"]


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "model_name" in variables
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all('model_name="$model_name"' in t["expr"] for t in panel["targets"]), panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24


def test_podmonitor_scrapes_the_head_pods_serve_port():
    monitors = [d for d in yaml.safe_load_all(PODMONITOR.read_text()) if d]
    assert all(d["apiVersion"] == "monitoring.coreos.com/v1" and d["kind"] == "PodMonitor" for d in monitors)
    rayservice = next(d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d and d["kind"] == "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    head_labels = {**head["metadata"]["labels"], "ray.io/node-type": "head"}  # the last one: set by KubeRay
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    mixserve = next(d for d in monitors if d["metadata"]["name"] == "mixserve")
    selector = mixserve["spec"]["selector"]["matchLabels"]
    assert selector.items() <= head_labels.items() and selector.get("ray.io/node-type") == "head"
    (endpoint,) = mixserve["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and head_ports[endpoint["port"]] == 8000
