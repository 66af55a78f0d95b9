"""``mixserve bench engine --quantization none,int8,int4,fp8``: the decode speed of each expert format in one run,
each against its own weight-bytes floor, and the kernels behind it.

(e) Formats. For each format (``none``: the checkpoint's dense experts in --dtype; int8 / int4 / fp8: the same
experts quantized on load, ``quantization=``; ``int4+attention`` ...: attention's projections quantized too,
``quantize_attention=True``) and each batch size, an in-process (W = 0) engine decodes ``batch``
prompts of --prompt-len tokens for --new-tokens greedy tokens (after one warm-up run), --repeats times; the formats
of one batch size are loaded side by side and run in turn (none, int8, ..., none, int8, ...), so a machine whose
speed drifts slows each alike. decode tokens/s = batch / median full-batch decode step (schedule, forward, sample).
Floor = the bytes one decode step must read (every non-expert matrix it multiplies by, ``MixtralModel.matrices``,
plus the experts its tokens hit, all as stored: quantized ones with their scales) / the memory bandwidth measured
here (best of 5 reads, ``sum``, of a 512 MiB float32 tensor), the median of the probes taken before each
interleaved round: a shared VM's bandwidth drifts (one run's 9 probes read 25.5-42.2 GB/s; a single probe at the
start of another read 19.7 GB/s where the dense step itself then read 25). Compute floor = the step's multiply-adds
(2 x every non-expert matrix's weights x the batch, plus 2 x each routed (token, expert) pair x an expert's 3 D F
weights) / the float32 matmul rate measured here (best of 3 2048^3 matmuls, the median of the same probes): where a
step must multiply more than it must read, no kernel gets it near its bytes floor (``step_over_both_floors``).
(f) Kernels. One expert matrix of --kernel-shape (default Mixtral-8x7B's w1, 14336 x 4096), median ms of --kernel-iters
calls per row count: dense ``F.linear`` in bfloat16 and float32, dense bfloat16 as the model runs it
(``workers.dense``: the fused CPU kernel at up to 32 rows on a CPU without bf16 units), then each quantized form as
mixserve runs it (``workers.quant``: the kernel, and where that kernel has a row limit its dequantize + matmul path,
forced) in --dtype, and where the fused CPU kernel runs, the same format without it (torch's kernels only). A
format's crossover is the first row count where its dequantize + matmul beats its kernel for few rows.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, cast

import torch
import torch.nn.functional as F

from cluster.bench import harness as h
from cluster.bench.steps import Recorder, drive
from cluster.checkpoint.load import parse_dtype
from cluster.checkpoint.locate import resolve
from cluster.checkpoint.quant.quantize import quantize
from cluster.checkpoint.tiny_model import MIXTRAL_LAYER_SPEC
from cluster.config.cluster import ClusterConfig
from cluster.config.dtype import cpu_has_fast_bf16
from cluster.config.model import ModelConfig
from cluster.engine.step import Executor
from cluster.runtime.frontend import build_frontend
from router.transport import LocalTransport
from workers import dense
from workers.model import MixtralModel
from workers.projection import matrix_bytes
from workers.quant import cpu_kernel
from workers.quant.linear import DequantLinear, FusedLinear, Int8Linear, prepare

FORMATS = ("none", "int8", "int4", "fp8")
ATTENTION = "+attention"  # a format's suffix: attention's projections quantized too (quantize_attention)
NO_FUSED = "without the fused CPU kernel"
COLUMNS = ["format", "batch", "decode_tokens_per_s", "speed_vs_none", "step_ms_p50", "floor_ms", "step_over_floor"]
COLUMNS += ["compute_floor_ms", "step_over_both_floors", "weight_mb_per_step", "expert_mb"]


def bandwidth_gb_s(mib: int = 512, iters: int = 5) -> float:
    """Read bandwidth of this process's threads: bytes of a float32 tensor over the best time of one ``sum``."""
    x = torch.ones(mib * 2**20 // 4)
    best = min(h.time_calls(lambda: x.sum(), iters))
    return x.numel() * 4 / best / 1e9


def flop_rate(n: int = 2048, iters: int = 3) -> float:
    """Multiply-adds this process's threads reach (FLOP/s): a float32 n x n x n matmul over its best time."""
    a = torch.randn(n, n)
    return 2 * n**3 / min(h.time_calls(lambda: a @ a, iters))


def split_format(label: str) -> tuple[str, bool] | None:
    """``int4+attention`` -> ("int4", True): the kind and whether attention is quantized too; None when invalid."""
    base = label.removesuffix(ATTENTION)
    attention = base != label
    return (base, attention) if base in FORMATS and not (attention and base == "none") else None


def model_of(o: Any) -> str:
    """--model, else one Mixtral-8x7B layer (``MIXTRAL_LAYER_SPEC``: Mixtral's share of expert bytes per token)."""
    return h.model_dir(o.model, MIXTRAL_LAYER_SPEC, name="mixtral-layer-v1")


def token_bytes(model: MixtralModel, config: ModelConfig, per_expert: float) -> dict[str, float]:
    """Share of the weight bytes one decoded token reads (at batch 1) per part: the top-k experts of every layer,
    attention (every 2-D matrix of the layers but the router), lm_head (or the tied embedding) and the routers."""
    parts = {"experts": config.num_layers * config.top_k * per_expert, "attention": 0.0, "lm_head": 0.0, "router": 0.0}
    for n, m in model.matrices().items():
        part = "lm_head" if n in ("lm_head", "embed_tokens") else "router" if ".gate" in n else "attention"
        parts[part] += matrix_bytes(m)
    total = sum(parts.values())
    return {k: v / total for k, v in parts.items()}


class Probes:
    """The machine's read bandwidth (GB/s) and float32 matmul rate (FLOP/s), probed again before each interleaved
    round; the floors take the median of each."""

    def __init__(self) -> None:
        self.bandwidth: list[float] = []
        self.flops: list[float] = []

    def probe(self) -> None:
        self.bandwidth.append(bandwidth_gb_s())
        self.flops.append(flop_rate())

    @property
    def typical(self) -> tuple[float, float]:
        return statistics.median(self.bandwidth), statistics.median(self.flops)


def format_runs(o: Any, cluster: dict[str, Any], kinds: list[str], batch: int, probes: Probes,
                run: h.Run) -> list[dict]:  # fmt: skip
    """Every format at one batch size, each in an engine of its own, their runs interleaved (none, int8, ..., none,
    int8, ...) so that a machine whose speed drifts during the run (a shared VM) slows every format alike."""
    loaded = []
    for kind in kinds:
        base, attention = split_format(kind) or ("none", False)
        options = {**cluster, "quantization": None if base == "none" else base, "max_num_seqs": max(batch, 1)}
        options["quantize_attention"] = attention
        config = resolve(ClusterConfig.create(model=model_of(o), **options))
        run(f"(e) {kind}, batch {batch}: loading, warm-up")
        fe = build_frontend(config, progress=False)
        fe.core.executor = cast(Executor, rec := Recorder(fe))
        vocab = fe.model_config.vocab_size - 3
        prompts = [[3 + (i * 7919 + j * 104729) % vocab for j in range(o.prompt_len)] for i in range(batch)]
        work = [(p, o.new_tokens) for p in prompts]
        drive(fe, rec, work)
        loaded.append((kind, fe, rec, work))
    steps: dict[str, list] = {kind: [] for kind in kinds}
    for i in range(o.repeats):
        run(
            f"(e) batch {batch}: bandwidth and FLOP/s probe, then run {i + 1} of {o.repeats} of each format, "
            "interleaved"
        )
        probes.probe()
        for kind, fe, rec, work in loaded:
            steps[kind] += [s for s in drive(fe, rec, work)[1] if s.decode and s.tokens == batch]
    return [format_row(kind, fe, batch, steps[kind]) for kind, fe, _, _ in loaded]


def format_row(kind: str, fe: Any, batch: int, steps: list) -> dict:
    """One format at one batch size: decode tokens/s, step p50, the bytes read per step and the multiply-adds of
    the same step (every dense matrix times the batch, every expert times the tokens routed to it); ``with_floors``
    turns those into floors once every probe is in."""
    transport = fe.experts.transport
    assert isinstance(transport, LocalTransport)
    (shard,) = transport.shards.values()
    per_expert = shard.nbytes() / len(shard.experts)  # type: ignore[attr-defined]
    matrices = list(fe.model.matrices().values())
    dense = sum(matrix_bytes(m) for m in matrices)
    hits = statistics.fmean(int((s.routed > 0).sum()) for s in steps)
    nbytes = dense + hits * per_expert
    step_s = statistics.median(s.step_s for s in steps)
    mc = fe.model_config
    routed = statistics.fmean(int(s.routed.sum()) for s in steps)  # (token, expert) pairs per step, all layers
    flop = 2 * (batch * sum(p.numel() for p in matrices) + routed * 3 * mc.hidden_size * mc.intermediate_size)
    return {
        "format": kind,
        "batch": batch,
        "held": shard.describe(),  # type: ignore[attr-defined]
        "decode_tokens_per_s": batch / step_s,
        "step_ms_p50": step_s * 1e3,
        "weight_mb_per_step": nbytes / 2**20,
        "flop_per_step": flop,
        "expert_mb": shard.nbytes() / 2**20,  # type: ignore[attr-defined]
        "token_bytes": token_bytes(fe.model, fe.model_config, per_expert),
    }


def with_floors(row: dict, bandwidth: float, flops: float) -> dict:
    """``row`` with its bytes floor (weight bytes over ``bandwidth`` GB/s) and compute floor (multiply-adds over
    ``flops``), and its step over each."""
    step_s = row["step_ms_p50"] / 1e3
    floor_s = row["weight_mb_per_step"] * 2**20 / (bandwidth * 1e9)
    compute_s = row["flop_per_step"] / flops
    return {
        **row,
        "floor_ms": floor_s * 1e3,
        "step_over_floor": step_s / floor_s,
        "compute_floor_ms": compute_s * 1e3,
        "step_over_both_floors": step_s / max(floor_s, compute_s),
    }


def kernel_table(o: Any, dtype: torch.dtype, run: h.Run) -> list[dict]:
    """(f): median ms per row count of each way to multiply by one expert matrix."""
    n, k = h.ints(o.kernel_shape, "kernel-shape", span=False)[:2]
    rows = h.ints(o.kernel_rows, "kernel-rows")
    run(f"(f) kernels: one {n} x {k} matrix, rows {rows}")
    w = torch.randn(n, k) * 0.02
    ways: dict[str, Any] = {
        "dense bfloat16 F.linear": lambda x, wb=w.bfloat16(): F.linear(x.bfloat16(), wb),
        "dense bfloat16 as mixserve runs it (workers.dense)": lambda x, wb=w.bfloat16(): dense.linear(x.bfloat16(), wb),
        "dense float32 F.linear": lambda x, wf=w: F.linear(x.float(), wf),
    }
    cpu = torch.device("cpu")
    for kind in ("int8", "int4", "fp8"):
        q = quantize(w, kind)
        lin = prepare(q, device=cpu, dtype=dtype)
        ways[f"{kind}: {lin.kernel}"] = lambda x, lin=lin: lin(x.to(dtype))
        if isinstance(lin, Int8Linear | FusedLinear):  # a kernel up to a row count, dequantize + matmul above
            ways[f"{kind}: dequantize + matmul (forced)"] = lambda x, lin=lin: DequantLinear.matmul(lin, x.to(dtype))
        if cpu_kernel.kernel() is not None:
            torch_only = prepare(q, device=cpu, dtype=dtype, cpu_mode="off")
            if torch_only.kernel != lin.kernel:
                ways[f"{kind}: {torch_only.kernel} ({NO_FUSED})"] = lambda x, lin=torch_only: lin(x.to(dtype))
    out = []
    with torch.inference_mode():
        for name, fn in ways.items():
            row: dict[str, Any] = {"way": name}
            for r in rows:
                x = torch.randn(r, k)
                row[f"{r} rows"] = statistics.median(h.time_calls(lambda fn=fn, x=x: fn(x), o.kernel_iters)) * 1e3
            out.append(row)
    return out


def crossover(kernels: list[dict], rows: list[int]) -> dict[str, int | None]:
    """Per format with a kernel for few rows: the first row count where its dequantize + matmul path beats that
    kernel (None: never within ``rows``)."""
    out: dict[str, int | None] = {}
    for row in kernels:
        kind, _, way = row["way"].partition(": ")
        forced = next((r for r in kernels if r["way"] == f"{kind}: dequantize + matmul (forced)"), None)
        if forced is None or forced is row or way.endswith(f"({NO_FUSED})"):
            continue
        out[kind] = next((r for r in rows if forced[f"{r} rows"] < row[f"{r} rows"]), None)
    return out


def goals_of(rows: list[dict], batches: list[int]) -> list[dict]:
    speed = {(r["format"], r["batch"]): r["decode_tokens_per_s"] for r in rows}
    out = []
    labels = list(dict.fromkeys(k for k, _ in speed))
    for kind, want in [(k, {"int4": 2.0, "int8": 1.5}.get(k.partition("+")[0])) for k in labels]:
        if want is not None and (kind, 1) in speed and ("none", 1) in speed:
            out.append(
                h.goal(
                    f"{kind} decode tokens/s >= {want}x none at batch 1",
                    speed[(kind, 1)] / speed[("none", 1)],
                    want,
                    at_least=True,
                )
            )
    top = max(batches)
    quantized = [k for k, b in speed if b == top and k != "none"]
    if quantized and ("none", top) in speed:
        worst = min(quantized, key=lambda k: speed[(k, top)])
        text = f"every format's decode tokens/s >= none at batch {top} (slowest / none)"
        out.append(
            h.goal(text, speed[(worst, top)] / speed[("none", top)], 1.0, at_least=True, note=f"slowest: {worst}")
        )
    worst_row = max(rows, key=lambda r: r["step_over_floor"])
    note = f"worst: {worst_row['format']} at batch {worst_row['batch']}"
    out.append(
        h.goal(
            "every decode step <= 1.3x its weight-bytes floor",
            worst_row["step_over_floor"],
            1.3,
            at_least=False,
            note=note,
        )
    )
    return out


def run_formats(o: Any, cluster: dict[str, Any], r: h.Run) -> dict:
    kinds = [k.strip() for k in o.quantization.split(",") if k.strip()]
    if not kinds or any(split_format(k) is None for k in kinds):
        raise SystemExit(
            f"mixserve bench engine: --quantization takes a list of {', '.join(FORMATS)}, each but none optionally "
            f"with {ATTENTION!r} (attention quantized too), not {o.quantization!r}"
        )
    asked = str(cluster.get("dtype") or "auto")
    dtype = parse_dtype("bfloat16" if asked == "auto" else asked)  # the formats are compared against bfloat16
    cluster = {**cluster, "dtype": str(dtype).removeprefix("torch.")}
    batches = h.ints(o.batch_sizes, "batch-sizes")
    probes = Probes()
    t0 = time.perf_counter()
    by_batch = [format_runs(o, cluster, kinds, b, probes, r) for b in batches]
    bandwidth, flops = probes.typical
    rows = [
        with_floors(row, bandwidth, flops) for k in kinds for runs in by_batch for row in runs if row["format"] == k
    ]
    dense = {x["batch"]: x["decode_tokens_per_s"] for x in rows if x["format"] == "none"}
    for row in rows:
        row["speed_vs_none"] = h.ratio(row["decode_tokens_per_s"], dense.get(row["batch"]))
    kernels = kernel_table(o, dtype, r) if o.kernel_iters else []
    cross = crossover(kernels, h.ints(o.kernel_rows, "kernel-rows")) if kernels else {}
    tables = [
        h.table(
            rows,
            COLUMNS,
            title=f"(e) decode per expert format ({cluster['dtype']}; bandwidth {bandwidth:.1f} GB/s, the median of "
            f"{len(probes.bandwidth)} probes, {min(probes.bandwidth):.1f}-{max(probes.bandwidth):.1f}; float32 matmul "
            f"{flops / 1e9:.0f} GFLOP/s)",
        )
    ]
    if kernels:
        cols = ["way"] + [c for c in kernels[0] if c != "way"]
        where = ", ".join(f"{kind} {rows}" for kind, rows in cross.items())
        title = (
            f"(f) one expert matrix {o.kernel_shape}, median ms (rows where dequantize + matmul takes over: {where})"
        )
        tables.append(h.table(kernels, cols, title=title))
    share = next((x["token_bytes"] for x in rows if x["format"] == "none"), rows[0]["token_bytes"])
    tables.insert(0, "bytes a token reads at batch 1 (" + rows[0]["format"] + " experts): " + ", ".join(
        f"{k} {v:.1%}" for k, v in share.items()) + " (Mixtral-8x7B in bfloat16: experts 88.4%, attention 10.5%, "
        "lm_head 1.0%)")  # fmt: skip
    results = {
        "formats": rows,
        "model": model_of(o),
        "bandwidth_gb_s": bandwidth,
        "bandwidth_gb_s_probes": probes.bandwidth,
        "float32_gflop_s": flops / 1e9,
        "float32_gflop_s_probes": [f / 1e9 for f in probes.flops],
        "cpu_has_bf16_units": cpu_has_fast_bf16(),
        "kernels": kernels,
        "crossover_rows": cross,
        "cpu_kernel": None if (k := cpu_kernel.kernel()) is None else k.name,
        "seconds": time.perf_counter() - t0,
    }
    settings = {"cluster": cluster, "formats": kinds}
    return r.finish(settings=settings, method=__doc__, results=results, goals=goals_of(rows, batches), tables=tables)
