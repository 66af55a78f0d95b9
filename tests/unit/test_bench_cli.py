"""Smoke tests of ``mixserve bench``: every benchmark runs end to end on a tiny model with minimal sizes and writes
a JSON report with the expected keys. The benchmarks' numbers are not checked here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.tiny_model import TinyModelSpec, write_tiny_model

REPORT_KEYS = {"benchmark", "created", "machine", "versions", "settings", "method", "results", "goals"}
SPEC = TinyModelSpec(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, experts=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("bench-model"), SPEC)


def run_bench(argv: list[str], out: Path) -> dict:
    assert main(["bench", *argv, "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert set(report) >= REPORT_KEYS
    assert {"cpu_count", "memory_bytes", "gpus", "platform"} <= set(report["machine"])
    assert {"python", "torch", "ray", "transformers", "mixserve"} <= set(report["versions"])
    assert report["goals"]
    for g in report["goals"]:
        assert {"goal", "measured", "met"} <= set(g)
        assert g["met"] in (True, False, None)
    return report


def test_bench_subcommands_are_registered():
    from cluster.bench import add_bench_command

    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers(dest="command"))
    for name in ("engine", "dispatch", "serve", "memory"):
        a = parser.parse_args(["bench", name])
        assert a.bench == name and callable(a.func)


def test_engine_bench(tiny, tmp_path):
    argv = ["engine", "--model", str(tiny), "--batch-sizes", "1,2", "--new-tokens", "3", "--prompt-len", "4"]
    argv += ["--repeats", "1", "--floor-iters", "1", "--mixed-requests", "3", "--mixed-prompt-len", "2,6"]
    argv += ["--mixed-max-tokens", "2,4", "--hf-batch", "2", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
    argv += ["--max-model-len", "64"]
    report = run_bench(argv, tmp_path / "engine.json")
    fixed = report["results"]["fixed"]
    assert [r["batch"] for r in fixed] == [1, 2]
    for r in fixed:
        assert r["floor"]["floor_s"] > 0
        for side in ("ours", "transformers"):
            assert {"tokens_per_s", "step_ms_p50", "step_over_floor"} <= set(r[side])
    assert report["results"]["mixed"]["useful_output_tokens"] == report["results"]["mixed"]["ours"]["output_tokens"]
    assert len(report["goals"]) == 5


@pytest.mark.ray
def test_dispatch_bench(tiny, tmp_path, ray_instance):
    argv = ["dispatch", "--model", str(tiny), "--workers", "1", "--tokens", "4", "--iters", "2", "--warmup", "1"]
    report = run_bench(argv, tmp_path / "dispatch.json")
    rows = report["results"]["rows"]
    assert {r["transport"] for r in rows} == {"object_ref", "gloo"}
    for r in rows:
        assert {"run_layer_s", "compute_sum_s", "echo_s", "overhead_s", "run_over_compute_plus_echo"} <= set(r)


def test_serve_goals_compare_with_the_w0_baseline():
    from cluster.bench.serve import ServeBenchSettings, goals_of

    levels = [
        {"concurrency": 1, "tokens_per_s": 10.0, "error_rate": 0.0},
        {"concurrency": 32, "tokens_per_s": 90.0, "error_rate": 0.0},
    ]
    gain, shard, errors = goals_of(levels, {"tokens_per_s": 100.0}, ServeBenchSettings())
    assert (gain["measured"], gain["met"]) == (9.0, True)
    assert (shard["measured"], shard["met"]) == (0.9, True)
    assert errors["met"] is True


@pytest.mark.ray
def test_memory_bench(tiny, tmp_path, ray_instance):
    report = run_bench(["memory", "--model", str(tiny), "--expert-workers", "1"], tmp_path / "memory.json")
    procs = report["results"]["processes"]
    assert [p["role"] for p in procs] == ["worker 0", "frontend"]
    assert all(p["rss_bytes"] > 0 for p in procs)
    assert report["results"]["frontend_info"]["expert_bytes"] == 0
