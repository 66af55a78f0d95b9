"""``mixserve bench memory``: resident memory of the frontend actor and of each expert worker of the sharded cluster
the offline ``LLM(expert_workers=W)`` runs (``cluster.runtime.offline.RemoteFrontend``), against the parameter bytes
each should hold.

RSS (VmRSS) and peak RSS (VmHWM) from /proc/<pid>/status, read inside each actor process (``__ray_call__``) after
one short greedy generation. Parameter bytes from the model config: a worker holds expert_param_count x bytes per
parameter of the dtype x the experts it holds; the frontend non_expert_param_count x bytes (its KV cache,
kv_cache_bytes, comes on top). Baseline: an idle 1-CPU Ray worker process that imported this module (torch and
mixserve). above_baseline = RSS - baseline - parameter bytes (- the KV cache for the frontend). The RSS goal
(parameters + 600 MB) is the workers'. MB = MiB.

--quantization none,int8,int4,fp8: one cluster per expert format (``none``: the dense experts in --dtype; the others
quantized on load). Per worker: stored = the expert bytes it holds (quantized ones as stored, scales included),
grown = the memory it allocated (RssAnon: RSS without the mapped pages of files and libraries, which grow ~10 MB as
kernels first run) after the generation minus the same just before it loaded its experts (the same process with
torch and mixserve imported: its runtime baseline; grown_rss_mb: the same in VmRSS), bf16 = its experts' bytes in
bfloat16. Goals: grown within 15% of stored for every worker; stored <= 0.30x bf16 for int4, <= 0.55x for int8
and fp8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray

from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.checkpoint.load import parse_dtype
from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.engine.sampling import SamplingParams
from cluster.runtime.offline import RemoteFrontend

MB = 1024 * 1024
ALLOWANCE_MB = 600


@dataclass
class Options(Common):
    """RSS of the frontend and each expert worker against the bytes they hold"""

    cluster_flags = ("expert_workers", "transport", "dtype", "max_num_seqs", "max_model_len")
    cluster_defaults = {"expert_workers": 2}
    warm_tokens: int = opt(8, "tokens of the one generation before measuring")
    quantization: str = opt("none", "expert formats, one cluster each: none (dense), int8, int4, fp8")


def rss_of(_actor: Any = None) -> dict[str, Any]:
    """Inside an actor (``__ray_call__`` passes the actor instance): its pid, RSS and peak RSS."""
    mem = h.proc_fields(f"/proc/{os.getpid()}/status")
    return {"pid": os.getpid(), "rss": h.kib_bytes(mem, "VmRSS") or 0, "peak_rss": h.kib_bytes(mem, "VmHWM")}


def process(role: str, rss: dict[str, Any], params: int, held: int, baseline: int, kv: int = 0) -> dict[str, Any]:
    """One process in MB: RSS against its parameter bytes (+ the KV cache for the frontend) and the baseline."""
    return {
        "role": role,
        "pid": rss["pid"],
        "rss_mb": rss["rss"] / MB,
        "peak_mb": (rss["peak_rss"] or 0) / MB,
        "params_mb": params / MB,
        "held_mb": held / MB,
        "kv_mb": kv / MB,
        "rss_minus_params_mb": (rss["rss"] - params) / MB,
        "above_baseline_mb": (rss["rss"] - baseline - params - kv) / MB,
    }


def run(o: Options, cluster: dict[str, Any]) -> dict:
    kinds = [k.strip() for k in o.quantization.split(",") if k.strip()]
    if not kinds or any(k not in ("none", "int8", "int4", "fp8") for k in kinds):
        raise SystemExit(f"mixserve bench memory: --quantization takes none,int8,int4,fp8, not {o.quantization!r}")
    r = h.Run("memory", o)
    runs = {k: measure(o, {**cluster, "quantization": None if k == "none" else k}, r) for k in kinds}
    config, rows, info = runs[kinds[0]]
    worst = max((x for x in rows if x["role"].startswith("worker")), key=lambda x: x["rss_minus_params_mb"])
    text = f"every worker RSS <= its parameter bytes + {ALLOWANCE_MB} MB (worst RSS - params, MB)"
    goals = [
        h.goal(text, worst["rss_minus_params_mb"], ALLOWANCE_MB, at_least=False, note=f"worst: {worst['role']}"),
        h.goal(
            "the frontend holds no expert bytes (frontend_info expert_bytes)", info["expert_bytes"], 0, at_least=False
        ),
    ]
    cols = ["role", "pid", "rss_mb", "peak_mb", "params_mb", "kv_mb", "rss_minus_params_mb", "above_baseline_mb"]
    tables = [h.table(rows, cols, title=f"resident memory per process ({kinds[0]})")]
    results: dict[str, Any] = {"processes": rows, "frontend_info": info, "baseline": rows[-1]}
    if kinds != ["none"]:
        formats = [dict(x, format=k) for k, (_, rs, _) in runs.items() for x in rs if x["role"].startswith("worker")]
        results["formats"] = formats
        goals += format_goals(formats)
        cols = ["format", "role", "bf16_mb", "stored_mb", "stored_over_bf16", "grown_mb", "grown_over_stored"]
        cols += ["grown_rss_mb", "held"]
        tables.append(h.table(formats, cols, title="expert workers per format: RSS grown while loading vs stored"))
    return r.finish(settings={"cluster": config.options()}, method=__doc__, results=results, goals=goals, tables=tables)


def format_goals(formats: list[dict[str, Any]]) -> list[dict]:
    worst = max(formats, key=lambda x: abs(x["grown_over_stored"] - 1))
    note = f"worst: {worst['format']} {worst['role']}"
    out = [h.goal("every worker's RSS grows within 15% of its stored expert bytes (|grown/stored - 1|)",
                  abs(worst["grown_over_stored"] - 1), 0.15, at_least=False, note=note)]  # fmt: skip
    for kinds, limit in ((("int4",), 0.30), (("int8", "fp8"), 0.55)):
        rows = [x for x in formats if x["format"] in kinds]
        if rows:
            top = max(rows, key=lambda x: x["stored_over_bf16"])
            text = f"{' / '.join(kinds)} expert bytes <= {limit}x bfloat16 (stored / bf16)"
            out.append(h.goal(text, top["stored_over_bf16"], limit, at_least=False, note=f"worst: {top['format']}"))
    return out


def measure(o: Options, cluster: dict[str, Any], r: h.Run) -> tuple[ClusterConfig, list[dict], dict]:
    """One cluster: each worker's and the frontend's memory (rows; the idle baseline last) and the frontend info."""
    config = resolve(ClusterConfig.create(model=h.model_dir(o.model), **cluster))
    parallel, load = config.parallel, config.load
    if parallel.expert_workers < 1:
        raise SystemExit("mixserve bench memory: --expert-workers must be >= 1 (the sharded path)")
    with h.local_ray(parallel.expert_workers + 3):
        r("baseline: an idle Ray worker process")
        baseline: dict[str, Any] = ray.get(ray.remote(num_cpus=1)(rss_of).remote())
        r(f"starting the cluster (W={parallel.expert_workers}, experts {load.quantization or 'dense'}), one generation")
        c = RemoteFrontend.start(config, progress=False)
        try:
            c.generate([[1, 100, 200, 300]], [SamplingParams(max_tokens=o.warm_tokens, temperature=0, ignore_eos=True)])
            info, workers = c.info(), c.placement()
            worker_rss = c.apply(lambda rt: ray.get([w.__ray_call__.remote(rss_of) for w in rt.pool.handles]))
            frontend_rss: dict[str, Any] = c.apply(lambda rt: rss_of())
        finally:
            c.shutdown()
    assert load.model is not None
    mc = ModelConfig.from_dir(load.model)
    itemsize = parse_dtype(load.dtype).itemsize
    rows = []
    for w, rss in zip(workers, worker_rss, strict=True):
        params = mc.expert_param_count() * itemsize * len(w["experts"])
        row = process(f"worker {w['worker']}", rss, params, w["expert_bytes"], baseline["rss"])
        bf16 = mc.expert_param_count() * 2 * len(w["experts"])
        grown = w["anon_rss_bytes"] - w["anon_rss_before_load"]
        rows.append({**row, "held": w.get("expert_format"), "bf16_mb": bf16 / MB, "stored_mb": w["expert_bytes"] / MB,
                     "stored_over_bf16": w["expert_bytes"] / bf16, "grown_mb": grown / MB,
                     "grown_rss_mb": (rss["rss"] - w["rss_before_load"]) / MB,
                     "grown_over_stored": grown / max(w["expert_bytes"], 1)})  # fmt: skip
    params = mc.non_expert_param_count() * itemsize
    rows.append(
        process("frontend", frontend_rss, params, info["frontend_bytes"], baseline["rss"], info["kv_cache_bytes"])
    )
    rows.append({"role": "idle Ray worker (baseline)", "pid": baseline["pid"], "rss_mb": baseline["rss"] / MB})
    return config, rows, info
