"""``mixserve bench engine --quantization`` and ``bench memory --quantization`` run end to end on a tiny model with
minimal sizes, and compute each goal from the figures they measured (speed and memory claims live in the reports,
never in tests)."""

from __future__ import annotations

import pytest

from cluster.bench import quant
from cluster.bench.quant import crossover
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from tests.unit.test_bench_cli import run_bench

SPEC = TinyModelSpec(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, experts=4, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("bench-model"), SPEC)


def test_engine_formats(tiny, tmp_path, monkeypatch):
    argv = ["engine", "--model", str(tiny), "--quantization", "none,int8,int4,fp8", "--batch-sizes", "1,2"]
    argv += ["--new-tokens", "3", "--prompt-len", "2", "--repeats", "2", "--max-model-len", "64"]
    argv += ["--kernel-shape", "64,128", "--kernel-rows", "1,16", "--kernel-iters", "1"]
    runs = []  # (format, batch) of each run, warm-ups included
    real = quant.drive

    def drive(fe, rec, work):
        runs.append((fe.config.load.quantization or "none", len(work)))
        return real(fe, rec, work)

    monkeypatch.setattr(quant, "drive", drive)
    bandwidths, rates = iter([10.0, 40.0, 20.0, 30.0]), iter([1e9, 4e9, 3e9, 2e9])  # one before each round
    monkeypatch.setattr(quant, "bandwidth_gb_s", lambda: next(bandwidths))
    monkeypatch.setattr(quant, "flop_rate", lambda: next(rates))
    report = run_bench(argv, tmp_path / "engine.json")
    kinds = [(k, 1) for k in ("none", "int8", "int4", "fp8")]
    # per batch size: each format loaded and warmed up, then the repeats run the formats in turn
    assert runs[:12] == kinds + kinds + kinds
    assert runs[12:] == [(k, 2) for k, _ in kinds] * 3
    res = report["results"]
    rows = {(r["format"], r["batch"]): r for r in res["formats"]}
    assert set(rows) == {(k, b) for k in ("none", "int8", "int4", "fp8") for b in (1, 2)}
    assert report["settings"]["cluster"]["dtype"] == "bfloat16"  # auto means the bfloat16 baseline here
    for r in rows.values():
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms_p50"])
        assert r["step_over_floor"] == pytest.approx(r["step_ms_p50"] / r["floor_ms"])
        assert r["step_over_both_floors"] == pytest.approx(r["step_ms_p50"] / max(r["floor_ms"], r["compute_floor_ms"]))
        # the compute floor: 2 x (batch x every dense matrix + top-2 x 2 layers x batch x an expert's 3 x 64 x 128)
        dense = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 4 * 64) + 32000 * 64  # 2 layers of q, o, k, v, router; lm_head
        flop = 2 * r["batch"] * (dense + 2 * 2 * 3 * 64 * 128)
        assert r["compute_floor_ms"] == pytest.approx(flop / (res["float32_gflop_s"] * 1e9) * 1e3)
        assert r["speed_vs_none"] == pytest.approx(
            r["decode_tokens_per_s"] / rows[("none", r["batch"])]["decode_tokens_per_s"]
        )
    assert rows[("int4", 1)]["expert_mb"] < 0.35 * rows[("none", 1)]["expert_mb"]
    assert "int4" in rows[("int4", 1)]["held"] and "dense" in rows[("none", 1)]["held"]
    goals = {g["goal"]: g["measured"] for g in report["goals"]}
    assert goals["int4 decode tokens/s >= 2.0x none at batch 1"] == rows[("int4", 1)]["speed_vs_none"]
    assert goals["every decode step <= 1.3x its weight-bytes floor"] == max(r["step_over_floor"] for r in rows.values())
    dense_ways = ["dense bfloat16 F.linear", "dense bfloat16 as mixserve runs it (workers.dense)"]
    dense_ways.append("dense float32 F.linear")
    assert [k["way"].split(":")[0] for k in res["kernels"]][:3] == dense_ways
    assert isinstance(res["cpu_has_bf16_units"], bool) and res["bandwidth_gb_s"] > 0
    # a probe before each interleaved round (2 batch sizes x 2 repeats); the floors take the median of each
    assert res["bandwidth_gb_s_probes"] == [10.0, 40.0, 20.0, 30.0] and res["bandwidth_gb_s"] == 25.0
    assert res["float32_gflop_s_probes"] == [1.0, 4.0, 3.0, 2.0] and res["float32_gflop_s"] == 2.5
    for r in rows.values():
        assert r["floor_ms"] == pytest.approx(r["weight_mb_per_step"] * 2**20 / (res["bandwidth_gb_s"] * 1e9) * 1e3)
    share = rows[("none", 1)]["token_bytes"]
    assert sum(share.values()) == pytest.approx(1.0)
    # per token, both bfloat16: 2 layers x top-2 x 3 x 64 x 128 expert weights against 2 x (128 + 64) x 64 of attention
    assert share["experts"] / share["attention"] == pytest.approx((2 * 2 * 3 * 64 * 128) / (2 * 192 * 64))
    assert share["lm_head"] / share["attention"] == pytest.approx(32000 * 64 / (2 * 192 * 64))


def test_crossover_is_the_first_row_count_where_dequantize_wins():
    kernels = [
        {"way": "dense float32 F.linear", "1 rows": 9.0, "8 rows": 9.0},
        {"way": "int8: fused decode + matmul (C, AVX-512) (<= 32 rows), dequantize + matmul above", "1 rows": 1.0,
         "8 rows": 5.0},
        {"way": "int8: dequantize + matmul (forced)", "1 rows": 3.0, "8 rows": 4.0},
        {"way": "int8: _weight_int8pack_mm (<= 32 rows), dequantize + matmul above (without the fused CPU kernel)",
         "1 rows": 0.5, "8 rows": 0.5},
        {"way": "fp8: fused decode + matmul (C, AVX-512) (<= 32 rows), dequantize + matmul above", "1 rows": 1.0,
         "8 rows": 2.0},
        {"way": "fp8: dequantize + matmul (forced)", "1 rows": 3.0, "8 rows": 4.0},
        {"way": "int4: _weight_int4pack_mm_for_cpu", "1 rows": 1.0, "8 rows": 2.0},
    ]  # fmt: skip
    assert crossover(kernels, [1, 8]) == {"int8": 8, "fp8": None}
    assert crossover(kernels[:2], [1, 8]) == {}


@pytest.mark.ray
def test_memory_formats(tiny, tmp_path, ray_instance):
    argv = ["memory", "--model", str(tiny), "--expert-workers", "1", "--quantization", "none,int4"]
    report = run_bench(argv, tmp_path / "memory.json")
    formats = report["results"]["formats"]
    assert [(f["format"], f["role"]) for f in formats] == [("none", "worker 0"), ("int4", "worker 0")]
    int4 = formats[1]
    assert (
        int4["stored_over_bf16"] == pytest.approx(int4["stored_mb"] / int4["bf16_mb"])
        and int4["stored_over_bf16"] < 0.4
    )
    assert int4["grown_over_stored"] == pytest.approx(int4["grown_mb"] / int4["stored_mb"])
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["int4 expert bytes <= 0.3x bfloat16 (stored / bf16)"]["measured"] == int4["stored_over_bf16"]


def test_the_probes_measure_a_rate(monkeypatch):
    """bandwidth_gb_s: bytes of the tensor over the best time of one sum; flop_rate: 2 n^3 over the best matmul."""
    times = iter([[0.5, 0.25, 1.0], [2.0, 0.5]])
    monkeypatch.setattr(quant.h, "time_calls", lambda fn, iters: (fn(), next(times))[1])
    assert quant.bandwidth_gb_s(mib=4, iters=3) == pytest.approx(4 * 2**20 / 0.25 / 1e9)
    assert quant.flop_rate(n=32, iters=2) == pytest.approx(2 * 32**3 / 0.5)
