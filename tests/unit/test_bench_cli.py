"""``mixserve bench``: every benchmark runs end to end through the CLI on a tiny model with minimal sizes, writes a
JSON report with the expected structure, and computes each goal from the figure it measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cluster.bench import add_bench_command
from cluster.bench.harness import ints, table
from cluster.bench.serve import goals_of
from cluster.bench.serve_pools import cases, compare_with_one_pool, pool_transports, ray_cpus, shares
from cluster.bench.serve_pools import goals_of as pool_goals
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.cli import main

REPORT_KEYS = {"benchmark", "created", "machine", "versions", "settings", "method", "results", "goals"}
SPEC = TinyModelSpec(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, experts=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("bench-model"), SPEC)


def run_bench(argv: list[str], out: Path) -> dict:
    assert main(["bench", *argv, "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert set(report) >= REPORT_KEYS
    assert report["benchmark"] == argv[0] and report["method"]
    assert {"cpu_model", "cpu_count", "memory_bytes", "gpus", "load_avg_start", "load_avg_end"} <= set(
        report["machine"]
    )
    assert {"python", "torch", "ray", "transformers", "mixserve"} <= set(report["versions"])
    assert report["settings"]["out"] == str(out)
    for g in report["goals"]:
        assert set(g) >= {"goal", "measured", "threshold", "met"}
        assert isinstance(g["measured"], (int, float))
        at_least = ">=" in g["goal"]
        assert g["met"] is (g["measured"] >= g["threshold"] if at_least else g["measured"] <= g["threshold"])
    return report


def test_subcommands_flags_and_defaults():
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers(dest="command"))
    for name in ("engine", "dispatch", "sharded", "serve", "memory"):
        a = parser.parse_args(["bench", name])
        assert a.bench == name and callable(a.func) and a.out is None
    # each benchmark's own defaults replace ClusterConfig's; its ClusterConfig flags come from the config class
    engine = parser.parse_args(["bench", "engine", "--dtype", "bfloat16", "--max-num-seqs", "4"])
    assert (engine.max_num_seqs, engine.max_model_len, engine.device, engine.dtype) == (4, 1024, "cpu", "bfloat16")
    assert parser.parse_args(["bench", "memory"]).expert_workers == 2


def test_serve_pools_and_straggler_flags():
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers(dest="command"))
    plain = parser.parse_args(["bench", "serve"])
    assert plain.frontend_replicas is None and plain.pool_concurrency is None  # the concurrency sweep, as before
    pools = parser.parse_args(["bench", "serve", "--frontend-replicas", "1,2,4", "--pool-concurrency", "8"])
    assert (pools.frontend_replicas, pools.pool_concurrency) == ("1,2,4", 8)
    assert pools.pool_transports == "object_ref,channel"
    s = parser.parse_args(["bench", "straggler"])
    assert (s.bench, s.expert_workers, s.transport, s.dtype) == ("straggler", 2, "object_ref", "float32")
    assert (s.prompts, s.max_tokens, s.freeze_s, s.worker) == (8, 160, 10.0, 1)
    assert parser.parse_args(["bench", "straggler", "--freeze-s", "3", "--max-tokens", "40"]).freeze_s == 3.0
    assert s.served is False and parser.parse_args(["bench", "straggler", "--served"]).served is True
    assert parser.parse_args(["bench", "serve", "--workload", "pooling"]).workload == "pooling"
    assert shares(5, 2) == [3, 2] and shares(4, 4) == [1, 1, 1, 1]
    # 4 apps of (1 frontend CPU + 0.5 ingress + 0.1 pool owner + 2 workers x 1 CPU), plus 1 for Serve
    assert ray_cpus({"expert_workers": 2}, [1, 2, 4]) == 16


def test_serve_without_frontend_replicas_runs_the_sweep_as_before(monkeypatch):
    import cluster.bench.serve as serve_bench

    seen = []
    monkeypatch.setattr(serve_bench, "run", lambda o, cluster: seen.append((o.concurrency, cluster)) or {})
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["bench", "serve", "--concurrency", "2,4"])
    assert a.func(a) == 0 and [c for c, _ in seen] == ["2,4"] and seen[0][1]["expert_workers"] == 2
    a = parser.parse_args(["bench", "serve", "--frontend-replicas", "1,2", "--url", "http://127.0.0.1:1"])
    with pytest.raises(SystemExit, match="drop --url"):
        a.func(a)
    assert len(seen) == 1


def test_serve_pools_goals_compare_one_pool_with_m_pools():
    def case(m: int, apps: int, tps: float, held: int, rows: float | None, transport: str = "object_ref") -> dict:
        return {"m": m, "apps": apps, "tokens_per_s": tps, "expert_bytes": held, "rows_per_matmul": rows,
                "error_rate": 0.0, "transport": transport}  # fmt: skip

    rows = [case(1, 1, 50.0, 100, 1.0), case(2, 1, 90.0, 100, 1.8), case(2, 2, 80.0, 200, 1.0)]
    rows.append(case(2, 2, 120.0, 200, None, "channel"))  # measured beside, never a goal's reference
    tps, held, merged, errors = pool_goals(rows, [1, 2], "object_ref")
    assert (tps["measured"], tps["met"]) == (90.0 / 80.0, True)
    assert (held["measured"], held["threshold"], held["met"]) == (0.5, 0.5, True)
    assert (merged["measured"], merged["met"]) == (1.8, True)
    assert errors["met"] is True
    (no_m2, _) = pool_goals(rows[:1], [1], "object_ref")
    assert no_m2["met"] is None and "2" in no_m2["note"]
    compare_with_one_pool(rows, "object_ref")
    assert [x["vs_one_pool"] for x in rows] == [1.0, 1.0, 80.0 / 90.0, 120.0 / 90.0]


def test_serve_pools_cases_and_transports():
    got = [(c.m, c.pools, c.transport) for c in cases([1, 4], "object_ref", ["object_ref", "channel"])]
    assert got == [(1, 1, "object_ref"), (1, 1, "channel"), (4, 1, "object_ref"), (4, 4, "object_ref"),
                   (4, 4, "channel")]  # fmt: skip
    assert pool_transports({"transport": "object_ref"}, "object_ref, channel") == (
        "object_ref",
        ["object_ref", "channel"],
    )
    with pytest.raises(SystemExit, match="--transport channel cannot share a pool"):
        pool_transports({"transport": "channel"}, "channel")
    with pytest.raises(SystemExit, match="--pool-transports takes object_ref, channel, not 'gloo'"):
        pool_transports({"transport": "object_ref"}, "object_ref,gloo")
    with pytest.raises(SystemExit, match="must include --transport"):
        pool_transports({"transport": "object_ref"}, "channel")


def test_list_flags_are_checked():
    assert ints("1,8", "batch-sizes") == [1, 8] and ints("8,256", "x", span=True) == [8, 256]
    for bad, span in (("", False), ("0,2", False), ("a", False), ("4,2", True), ("1,2,3", True)):
        with pytest.raises(SystemExit, match="--x takes"):
            ints(bad, "x", span=span)


def test_table_aligns_text_left_and_numbers_right():
    rows = [{"name": "a", "ms": 1.23456, "n": None}, {"name": "bbb", "ms": 123.456, "n": 7}]
    lines = table(rows, ["name", "ms", "n"], title="t").splitlines()
    assert lines == ["t", "name  ms     n", "----  -----  -", "a      1.23  -", "bbb   123.5  7"]


def test_serve_goals_compare_with_the_w0_baseline():
    levels = [
        {"concurrency": 1, "tokens_per_s": 10.0, "error_rate": 0.0},
        {"concurrency": 32, "tokens_per_s": 90.0, "error_rate": 0.0},
    ]
    gain, shard, errors = goals_of(levels, {"tokens_per_s": 100.0}, "sharded (W=2)")
    assert (gain["measured"], gain["met"]) == (9.0, True)
    assert (shard["measured"], shard["met"]) == (0.9, True)
    assert errors["met"] is True
    _, no_baseline, _ = goals_of(levels, None, "target")
    assert no_baseline["met"] is None and "baseline" in no_baseline["note"]


def test_engine_bench(tiny, tmp_path):
    argv = ["engine", "--model", str(tiny), "--batch-sizes", "1,2", "--new-tokens", "3", "--prompt-len", "4"]
    argv += ["--repeats", "1", "--floor-iters", "1", "--mixed-requests", "3", "--mixed-prompt-len", "2,6"]
    argv += ["--mixed-max-tokens", "2,4", "--hf-batch", "2", "--max-num-seqs", "4", "--max-num-batched-tokens", "16"]
    argv += ["--max-model-len", "64", "--prefix-requests", "3", "--prefix-len", "32", "--prefix-question-len", "2,4"]
    argv += ["--prefix-new-tokens", "2", "--capacity-requests", "6", "--capacity-len", "16", "--capacity-slots", "4"]
    report = run_bench(argv, tmp_path / "engine.json")
    fixed, mixed = report["results"]["fixed"], report["results"]["mixed"]
    assert [r["batch"] for r in fixed] == [1, 2]
    for r in fixed:
        assert r["floor"]["floor_ms"] > 0 and r["floor"]["weight_bytes"] > 0
        # two decode steps per run (3 new tokens: the first comes from the prefill step)
        assert r["ours"]["decode_steps"] == 2 and r["transformers"]["decode_steps"] == 2
        assert r["ours"]["step_over_floor"] == pytest.approx(r["ours"]["step_ms_p50"] / r["floor"]["floor_ms"])
        inter = r["floor"]["interleaved"]  # the same two decode steps again, each followed by its floor replay
        assert inter["steps"] == 2 and inter["ratio"] == pytest.approx(inter["step_ms_p50"] / inter["floor_ms_p50"])
    assert mixed["useful_output_tokens"] == mixed["ours"]["output_tokens"]
    assert sum(p["n"] for p in mixed["forward_passes"] if "n" in p) > 0
    prefix, capacity = report["results"]["prefix_sharing"], report["results"]["capacity"]
    off, on = prefix["sides"]
    assert prefix["same_outputs"] and off["prefix_cache_hits"] == 0 and on["prefix_cache_hits"] > 0
    assert on["cached_prompt_tokens"] == 2 * 32  # two of the three requests reuse the 32-token system prompt
    # 4 slots of 64 positions = 16 blocks of 16: six 16-token sequences (two blocks each: 8 + 8 tokens) all fit
    assert capacity["slot_cache_sequences"] == 4 and capacity["paged_peak_sequences"] == 6
    goals = report["goals"]
    assert len(goals) == 7
    assert [g["measured"] for g in goals] == [
        fixed[0]["tokens_per_s_ratio"],
        fixed[1]["tokens_per_s_ratio"],
        fixed[0]["floor"]["interleaved"]["ratio"],
        fixed[1]["floor"]["interleaved"]["ratio"],
        mixed["tokens_per_s_ratio"],
        prefix["ttft_p50_speedup"],
        capacity["ratio"],
    ]


@pytest.mark.ray
def test_dispatch_bench(tiny, tmp_path, ray_instance):
    argv = ["dispatch", "--model", str(tiny), "--workers", "1", "--tokens", "4", "--iters", "2", "--warmup", "1"]
    report = run_bench([*argv, "--transports", "object_ref,channel"], tmp_path / "dispatch.json")
    rows = report["results"]["rows"]
    assert [(r["transport"], r["workers"], r["tokens"]) for r in rows] == [("object_ref", 1, 4), ("channel", 1, 4)]
    for r in rows:
        assert r["forward_s"] > 0 and r["echo_s"] > 0 and r["empty_s"] > 0 and r["compute_max_s"] > 0
        assert r["pipe_s"] > 0 and r["bytes_each_way"] > 0
        assert r["forward_over_compute_plus_echo"] == pytest.approx(r["forward_s"] / (r["compute_sum_s"] + r["echo_s"]))
        assert r["overhead_s"] == pytest.approx(r["forward_s"] - r["compute_max_s"])
        assert r["overhead_over_floor"] == pytest.approx(r["overhead_s"] / r["pipe_s"])
    measured = [g["measured"] for g in report["goals"]]
    assert measured == [*(r["forward_over_compute_plus_echo"] for r in rows), rows[1]["overhead_over_floor"]]


@pytest.mark.ray
def test_sharded_bench(tiny, tmp_path, ray_instance):
    argv = ["sharded", "--model", str(tiny), "--workers", "0,2", "--transports", "channel", "--batch", "4"]
    argv += ["--prompt-len", "3", "--new-tokens", "4", "--repeats", "1", "--max-num-seqs", "4", "--max-model-len", "64"]
    report = run_bench(argv, tmp_path / "sharded.json")
    rows = report["results"]["rows"]
    assert [(r["workers"], r["transport"], r["overlap"]) for r in rows] == [
        (0, "in-process", "-"),
        (2, "channel", "on"),
        (2, "channel", "off"),
    ]
    assert all(r["same_tokens"] and r["decode_steps"] == 3 for r in rows)
    assert rows[1]["split_steps"] > 0 and rows[2]["split_steps"] == 0  # overlap on: batch 4 runs as 2 + 2
    assert rows[0]["ratio_to_w0"] == 1.0
    assert rows[1]["ratio_to_w0"] == pytest.approx(rows[1]["decode_step_s"] / rows[0]["decode_step_s"])
    assert [g["measured"] for g in report["goals"]] == [min(r["ratio_to_w0"] for r in rows[1:])]


@pytest.mark.ray
def test_memory_bench(tiny, tmp_path, ray_instance):
    report = run_bench(["memory", "--model", str(tiny), "--expert-workers", "1"], tmp_path / "memory.json")
    procs = report["results"]["processes"]
    assert [p["role"] for p in procs] == ["worker 0", "frontend", "idle Ray worker (baseline)"]
    worker, frontend = procs[0], procs[1]
    assert worker["rss_mb"] > 0 and frontend["rss_mb"] > 0
    assert worker["params_mb"] == pytest.approx(worker["held_mb"])  # all 4 experts of both layers, from the config
    assert report["results"]["frontend_info"]["expert_bytes"] == 0
    assert [g["measured"] for g in report["goals"]] == [worker["rss_minus_params_mb"], 0]
