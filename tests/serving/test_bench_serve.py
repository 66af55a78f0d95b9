"""`mixserve bench serve --url` against the running test server (a real load generator over HTTP)."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from tests.serving.conftest import API_KEY

pytestmark = [pytest.mark.ray, pytest.mark.serving]


def test_serve_bench_against_a_running_server(served, tmp_path):
    base, _, _ = served
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--url", base, "--api-key", API_KEY, "--concurrency", "1,2", "--max-tokens", "3"]
    argv += ["--requests-per-level", "2", "--skip-baseline", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    levels = report["results"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["errors"] == 0 and lv["output_tokens"] == 3 * lv["requests"]
        assert {"ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tokens_per_s"} <= set(lv)
    assert report["results"]["baseline_w0"] is None
    assert {"cpu_count", "memory_bytes", "gpus", "platform"} <= set(report["machine"])
