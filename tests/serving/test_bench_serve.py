"""`mixserve bench serve --url` against the running test server (a real load generator over HTTP)."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from tests.serving.helpers import API_KEY

pytestmark = [pytest.mark.ray, pytest.mark.serving]


def test_serve_bench_against_a_running_server(served, tmp_path):
    base, _, _ = served
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--url", base, "--api-key", API_KEY, "--concurrency", "1,2", "--max-tokens", "3"]
    argv += ["--requests-per-level", "2", "--skip-baseline", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {"benchmark", "created", "machine", "versions", "settings", "method", "results", "goals"} <= set(report)
    assert report["settings"]["api_key"] == "***" and report["settings"]["server"] == "external"
    levels = report["results"]["levels"]
    assert [(lv["server"], lv["concurrency"]) for lv in levels] == [("target", 1), ("target", 2)]
    for lv in levels:
        assert lv["errors"] == 0 and lv["output_tokens"] == 3 * lv["requests"]
        assert lv["ttft_ms_p50"] > 0 and lv["itl_ms_p50"] > 0 and lv["tokens_per_s"] > 0
        assert lv["tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["wall_s"])
    assert report["results"]["baseline_w0"] is None
    gain, shard, errors = report["goals"]
    assert gain["measured"] == pytest.approx(levels[1]["tokens_per_s"] / levels[0]["tokens_per_s"])
    assert gain["met"] is (gain["measured"] >= 8.0)
    assert shard["measured"] is None and shard["met"] is None  # no W=0 baseline without --baseline-url
    assert (errors["measured"], errors["met"]) == (0.0, True)
    assert {"cpu_count", "memory_bytes", "gpus", "platform", "load_avg_end"} <= set(report["machine"])


def test_pooling_bench_against_a_running_server(served, tmp_path):
    """--workload pooling: embedding requests per second against transformers' batched forward on the same inputs,
    every served vector compared with transformers' (a float32 checkpoint, served in float32)."""
    base, _, folder = served
    out = tmp_path / "pooling.json"
    argv = ["bench", "serve", "--url", base, "--api-key", API_KEY, "--workload", "pooling", "--model", str(folder)]
    argv += ["--concurrency", "1,4", "--requests-per-level", "4", "--prompt-len", "8,40", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["workload"] == "pooling" and report["settings"]["server"] == "external"
    levels = report["results"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] == 4
        assert lv["requests_per_s"] > 0 and lv["transformers_per_s"] > 0
        assert lv["vs_transformers"] == pytest.approx(lv["requests_per_s"] / lv["transformers_per_s"])
        assert lv["max_abs_diff"] < 1e-4
    assert [g["met"] for g in report["goals"]] == [True, True]
