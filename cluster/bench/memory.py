"""``mixserve bench memory``: resident memory of the frontend actor and of each expert worker of a sharded
``LLM(expert_workers=W)``, beside the parameter bytes each should hold and the RSS of an idle Ray actor process
that imported torch (the baseline every process pays)."""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any

from cluster.bench import common

MB = 1024 * 1024
ALLOWANCE_MB = 600
BYTES_PER = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryBenchSettings:
    model: str
    expert_workers: int = 2
    dtype: str = "float32"
    warm_tokens: int = 8
    max_num_seqs: int = 16
    max_model_len: int | None = None


# ---------------------------------------------------------------------- inside the actors
def rss_of_actor(_actor: Any = None) -> dict[str, Any]:
    """Runs inside an actor (via ``__ray_call__``, which passes the actor instance): its pid and RSS."""
    return {"pid": os.getpid(), **common.rss_bytes()}


class IdleTorchActor:
    """The baseline: a Ray actor process that only imported torch."""

    def __init__(self) -> None:
        import torch

        self.threads = torch.get_num_threads()

    def rss(self) -> dict[str, Any]:
        return rss_of_actor()


# ---------------------------------------------------------------------- expected bytes (no Ray)
def expected_bytes(config: Any, experts_held: int, dtype: str) -> dict[str, int]:
    """Parameter bytes from the config: one worker's experts, and the frontend's non-expert weights."""
    per = BYTES_PER[dtype]
    return {
        "expert": config.expert_param_count() * per * experts_held,
        "frontend": config.non_expert_param_count() * per,
    }


def process_row(
    role: str, rss: dict[str, Any], params: int, held: int, baseline: int, kv_cache: int = 0
) -> dict[str, Any]:
    """One process: RSS against its parameter bytes (+ KV cache for the frontend) and the idle-actor baseline."""
    r = rss["rss"] or 0
    return {
        "role": role,
        "pid": rss["pid"],
        "rss_bytes": r,
        "peak_rss_bytes": rss["peak_rss"],
        "param_bytes": params,
        "held_bytes_reported": held,
        "kv_cache_bytes": kv_cache,
        "rss_minus_params_bytes": r - params,
        "overhead_above_baseline_bytes": r - baseline - params - kv_cache,
        "limit_bytes": params + ALLOWANCE_MB * MB,
    }


# ---------------------------------------------------------------------- driver side
def measure_baseline() -> dict[str, Any]:
    import ray

    actor = ray.remote(IdleTorchActor).options(num_cpus=1).remote()
    try:
        return ray.get(actor.rss.remote())
    finally:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


def measure_cluster(s: MemoryBenchSettings, baseline: int, progress: common.Progress) -> dict[str, Any]:
    import ray

    from cluster.config import ModelConfig
    from cluster.llm import LLM
    from cluster.sampling import SamplingParams

    config = ModelConfig.from_dir(s.model)
    progress(f"starting LLM(expert_workers={s.expert_workers}) on {s.model}")
    kw = {"max_num_seqs": s.max_num_seqs, "max_num_batched_tokens": max(512, s.max_num_seqs)}
    with LLM(
        s.model, expert_workers=s.expert_workers, dtype=s.dtype, max_model_len=s.max_model_len, progress=False, **kw
    ) as llm:
        progress(f"one short generation ({s.warm_tokens} tokens) so every process is in its steady state")
        llm.generate([[1, 100, 200, 300]], SamplingParams(max_tokens=s.warm_tokens, temperature=0, ignore_eos=True))
        info = llm.frontend_info()
        cluster = llm._cluster
        workers = ray.get([w.info.remote() for w in cluster.workers])
        worker_rss = ray.get([w.__ray_call__.remote(rss_of_actor) for w in cluster.workers])
        frontend_rss = ray.get(cluster.frontend.__ray_call__.remote(rss_of_actor))
    rows = []
    for w, rss in zip(workers, worker_rss, strict=True):
        exp = expected_bytes(config, len(w["experts"]), s.dtype)["expert"]
        rows.append(process_row(f"worker {w['worker']}", rss, exp, w["expert_bytes"], baseline))
    fe = expected_bytes(config, 0, s.dtype)["frontend"]
    frontend = process_row("frontend", frontend_rss, fe, info["frontend_bytes"], baseline, info["kv_cache_bytes"])
    rows.append({**frontend, "limit_bytes": None})  # the RSS goal is the workers'; the frontend also holds its KV cache
    return {"processes": rows, "frontend_info": info}


METHOD = (
    "RSS (VmRSS) and peak RSS (VmHWM) from /proc/<pid>/status, read inside each actor process via "
    "actor.__ray_call__ after one short greedy generation. Parameter bytes from the config: a worker holds "
    "expert_param_count x bytes per parameter x experts it holds; the frontend holds non_expert_param_count x "
    "bytes. Baseline: a 1-CPU Ray actor that only imported torch. overhead_above_baseline = RSS - baseline - "
    "parameter bytes (- the KV cache for the frontend: kv_cache_bytes, allocated with zeros, resident except pages the "
    "allocator handed out already zeroed and nothing touched since). The RSS goal (params + 600 MB) is the "
    "workers'. MB = MiB."
)


def goals_of(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[dict]:
    workers = [r for r in rows if r["role"].startswith("worker")]
    worst = max(workers, key=lambda r: r["rss_minus_params_bytes"])
    return [
        common.goal(
            f"every worker RSS <= its parameter bytes + {ALLOWANCE_MB} MB (worst RSS - params, MB)",
            worst["rss_minus_params_bytes"] / MB,
            float(ALLOWANCE_MB),
            at_least=False,
            note=f"worst: {worst['role']}",
        ),
        common.goal(
            "the frontend holds no expert bytes (frontend_info expert_bytes)", info["expert_bytes"], 0, at_least=False
        ),
    ]


def table_of(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    def mb(v: int | None) -> float | None:
        return None if v is None else v / MB

    body = [
        (
            r["role"],
            r["pid"],
            mb(r["rss_bytes"]),
            mb(r["peak_rss_bytes"]),
            mb(r["param_bytes"]),
            mb(r["kv_cache_bytes"]),
            mb(r["rss_minus_params_bytes"]),
            mb(r["overhead_above_baseline_bytes"]),
            mb(r["limit_bytes"]),
        )
        for r in rows
    ]
    body.append(
        (
            "idle actor + torch",
            baseline["pid"],
            mb(baseline["rss"]),
            mb(baseline["peak_rss"]),
            0.0,
            0.0,
            None,
            None,
            None,
        )
    )
    return common.table(
        ["process", "pid", "RSS MB", "peak MB", "params MB", "KV MB", "RSS-params", "above baseline", "limit MB"],
        body,
        title="resident memory per process",
    )


def run_memory_bench(s: MemoryBenchSettings, *, out: str | None = None, quiet: bool = False) -> dict:
    import ray

    progress = common.Progress("memory", quiet=quiet)
    machine = common.machine_info()
    started = common.init_ray(s.expert_workers + 3)
    try:
        progress("baseline: an idle Ray actor that imported torch")
        baseline = measure_baseline()
        measured = measure_cluster(s, baseline["rss"] or 0, progress)
    finally:
        if started:
            ray.shutdown()
    machine.update(common.end_probes(progress))
    results = {"baseline": baseline, **measured}
    payload = common.report(
        "memory",
        settings=asdict(s),
        method=METHOD,
        results=results,
        goals=goals_of(measured["processes"], measured["frontend_info"]),
        machine=machine,
    )
    common.finish(payload, out, [table_of(measured["processes"], baseline)])
    return payload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="RSS of the frontend and each expert worker against the bytes they hold")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench model, made once)")
    p.add_argument("--expert-workers", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(BYTES_PER), default="float32")
    p.add_argument("--max-num-seqs", type=int, default=16, help="KV-cache slots of the frontend")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's, capped at 8192")
    common.add_common_args(p)
    p.set_defaults(func=main)


def main(a: argparse.Namespace) -> int:
    if a.expert_workers < 1:
        raise SystemExit("mixserve bench memory: --expert-workers must be >= 1 (the sharded path)")
    s = MemoryBenchSettings(
        model=common.resolve_model(a.model),
        expert_workers=a.expert_workers,
        dtype=a.dtype,
        max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len,
    )
    run_memory_bench(s, out=a.out, quiet=a.quiet)
    return 0
