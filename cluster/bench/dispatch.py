"""``mixserve bench dispatch``: one layer's all-to-all on the sharded path against its floor.

For each W and transport a real ``ExpertCluster`` is started (W ``ExpertWorker`` actors and the ``FrontendActor``
with its expert client). Inside the frontend actor (``__ray_call__``), per T and per layer: random hidden states
x [T, D] through the layer's own post-attention RMSNorm, routed by its own gate (``router.gate.route``); then:

- forward: ``experts.forward(layer, x, routing)`` (dispatch plan, exchange with the workers' ``run``, combine);
- echo floor: the same call on the same client with its handles' ``run`` swapped for ``ExpertWorker.echo`` (the
  same payload back, no compute; over RDT through the same stage/absorb path);
- compute: each worker's message through ``ExpertWorker.run`` timed inside that worker process (no transport), one
  worker at a time. compute_sum adds the workers (the critical path when there are fewer free cores than workers),
  compute_max takes the slowest (perfect parallelism: the strict variant).

Times per layer call: median over iterations, mean over layers. overhead = forward - compute_sum. The goal is
forward / (compute_sum + echo), worst case over W and T per transport.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import ray
import torch

from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.builder import ClusterConfig
from cluster.cluster import ExpertCluster, FrontendActor
from cluster.config import ModelConfig
from router import dispatch
from router.client import TRANSPORTS
from router.gate import route
from router.object_ref import RayExperts
from router.rdt import RdtExperts
from workers.expert_worker import ExpertWorker
from workers.model import DecoderLayer


@dataclass
class Options(Common):
    """one layer's all-to-all against the echo floor, per W, transport and T"""

    cluster_flags = ("dtype", "device", "gpus_per_worker", "placement_strategy", "worker_timeout_s")
    workers: str = opt("1,2,4", "expert-worker counts W, comma-separated")
    transports: str = opt("object_ref,gloo", f"transports, comma-separated ({', '.join(TRANSPORTS)})")
    tokens: str = opt("8,64", "tokens per step T, comma-separated")
    iters: int = opt(30, "timed calls per layer")
    warmup: int = opt(5, "untimed calls per layer first (the first creates the RDT group)")
    seed: int = opt(0, "seed of the hidden states")


def time_runs(worker: ExpertWorker, jobs: list[tuple], iters: int, warmup: int) -> list[list[float]]:
    """Inside an expert worker (``__ray_call__``): seconds of its ``run`` for each job."""
    with torch.inference_mode():
        return [h.time_calls(lambda j=j: worker.run(*j), iters, warmup=warmup) for j in jobs]


def measure(actor: FrontendActor, tokens: list[int], iters: int, warmup: int, seed: int) -> list[dict[str, Any]]:
    """Inside the frontend actor (``__ray_call__``): one row per T (see the module docstring)."""
    model, client = actor.frontend.model, actor.frontend.experts
    assert isinstance(client, (RayExperts, RdtExperts))
    real = list(client.handles)
    echo = [SimpleNamespace(run=x.echo) for x in real]  # handles whose run is the worker's echo
    rows = []
    for t in tokens:
        g = torch.Generator().manual_seed(seed + t)
        cases = []
        with torch.inference_mode():
            for i, layer in enumerate(model.layers):
                assert isinstance(layer, DecoderLayer)
                x = torch.randn(t, model.config.hidden_size, generator=g).to(model.device, model.dtype)
                x = layer.post_attention_layernorm(x)
                cases.append((i, x, route(x, layer.block_sparse_moe.gate, layer.block_sparse_moe.top_k)))
        seconds: dict[str, list[list[float]]] = {"forward": [[] for _ in cases], "echo": [[] for _ in cases]}
        for it in range(warmup + iters):
            for i, case in enumerate(cases):
                for kind, handles in (("forward", real), ("echo", echo)):
                    client.handles = handles
                    t0 = time.perf_counter()
                    client.forward(*case)
                    if it >= warmup:
                        seconds[kind][i].append(time.perf_counter() - t0)
        client.handles = real
        per_layer: list[list[float]] = [[] for _ in cases]  # median compute seconds of each worker with rows
        for w, handle in enumerate(real):
            jobs, where = [], []
            for i, (layer, x, routing) in enumerate(cases):
                for m in dispatch.plan(routing, client.placement.worker_tensor(layer)):
                    if m.worker == w:
                        jobs.append((layer, x[m.tokens], m.rows, m.experts, m.weights))
                        where.append(i)
            for i, ts in zip(where, ray.get(handle.__ray_call__.remote(time_runs, jobs, iters, warmup)), strict=True):
                per_layer[i].append(statistics.median(ts))
        fwd, back = (statistics.fmean(statistics.median(v) for v in seconds[k]) for k in ("forward", "echo"))
        csum, cmax = statistics.fmean(sum(v) for v in per_layer), statistics.fmean(max(v) for v in per_layer)
        messages = dispatch.plan(cases[0][2], client.placement.worker_tensor(0))
        rows.append(
            {
                "tokens": t,
                "forward_s": fwd,
                "echo_s": back,
                "compute_sum_s": csum,
                "compute_max_s": cmax,
                "overhead_s": fwd - csum,
                "overhead_over_echo": h.ratio(fwd - csum, back),
                "forward_over_compute_plus_echo": h.ratio(fwd, csum + back),
                "strict": h.ratio(fwd, cmax + back),  # with perfectly parallel workers
                "layer0_messages": len(messages),
                "layer0_bytes_each_way": sum(len(m.tokens) * x.shape[1] * x.element_size() for m in messages),
                "frontend_threads": torch.get_num_threads(),
            }
        )
    return rows


def run(o: Options, cluster: dict[str, Any]) -> dict:
    transports = [t.strip() for t in o.transports.split(",") if t.strip()]
    if not transports or set(transports) - set(TRANSPORTS):
        raise SystemExit(f"mixserve bench dispatch: --transports takes {', '.join(TRANSPORTS)}, not {o.transports!r}")
    workers, tokens = h.ints(o.workers, "workers"), h.ints(o.tokens, "tokens")
    r = h.Run("dispatch", o)
    model = h.model_dir(o.model)
    rows = []
    with h.local_ray(max(workers) + 2):
        for w in workers:
            for transport in transports:
                config = ClusterConfig.create(model=model, expert_workers=w, transport=transport, **cluster)
                r(f"W={w} {transport}: starting the cluster, then T={o.tokens}")
                c = ExpertCluster.start(config, config.placement(ModelConfig.from_dir(model)), progress=False)
                try:
                    timed = ray.get(c.frontend.__ray_call__.remote(measure, tokens, o.iters, o.warmup, o.seed))
                finally:
                    c.shutdown()
                rows += [{"workers": w, "transport": transport, **row} for row in timed]
    goals = []
    for transport in transports:
        worst = max((x for x in rows if x["transport"] == transport), key=lambda x: x["forward_over_compute_plus_echo"])
        text = f"dispatch ({transport}) forward <= 1.3x (compute + echo floor)"
        note = f"worst case W={worst['workers']} T={worst['tokens']}"
        goals.append(h.goal(text, worst["forward_over_compute_plus_echo"], 1.3, at_least=False, note=note))
    ms = [{**x, **{k[:-2] + "_ms": x[k] * 1e3 for k in x if k.endswith("_s")}} for x in rows]
    cols = ["workers", "tokens", "transport", "forward_ms", "compute_sum_ms", "echo_ms", "overhead_ms"]
    cols += ["overhead_over_echo", "forward_over_compute_plus_echo", "strict"]
    title = "one layer's all-to-all per call (strict: forward / (slowest worker's compute + echo))"
    tables = [h.table(ms, cols, title=title)]
    settings = {"cluster": cluster}
    return r.finish(settings=settings, method=__doc__, results={"rows": rows}, goals=goals, tables=tables)
