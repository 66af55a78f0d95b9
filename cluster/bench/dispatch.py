"""``mixserve bench dispatch``: one layer's all-to-all on the sharded path against its floor.

First the floor: a raw OS pipe round trip between this process and a child process (a length-prefixed echo, the
same bytes each way as a layer's messages), per T. Then for each W and transport the offline API's sharded cluster
is started (``cluster.runtime.offline.RemoteFrontend``: the frontend actor with its W expert workers). Inside the
frontend actor (``apply_model``), per T and per layer: random hidden states x [T, D] through the layer's own
post-attention RMSNorm, routed by its own gate (``router.gate.route``); then:

- forward: ``experts.forward(layer, x, routing)`` (dispatch plan, exchange with the workers' ``run``, combine);
- echo: the same call with the transport's ``echo`` on (the workers send the same payload back, no compute; over RDT
  through the same stage/absorb path, over channels through the same graph);
- empty: an exchange with an empty message for every worker (the transport's fixed cost per layer);
- compute: each worker's message through ``ExpertWorker.run`` timed inside that worker process (no transport), one
  worker at a time. compute_sum adds the workers (the critical path when there are fewer free cores than workers),
  compute_max takes the slowest (perfect parallelism).

Times per layer call: median over iterations, mean over layers. overhead = forward - compute_max (what the
transport adds to the slowest worker's compute); overhead_over_floor = overhead / pipe round trip of the same
bytes. Goals: forward / (compute_sum + echo) per transport; for the channel transport overhead <= 3x the pipe floor
(worst case over W and T) and <= 0.3 ms at W = 2.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.config.cluster import ClusterConfig
from cluster.config.transports import NAMES as TRANSPORTS
from cluster.runtime.offline import RemoteFrontend
from router import dispatch
from router.client import ExpertClient
from router.dispatch import WorkerMessage
from router.gate import Routing, route
from router.transport import RemoteTransport
from workers.expert_worker import ExpertWorker
from workers.model import DecoderLayer, MixtralModel


@dataclass
class Options(Common):
    """one layer's all-to-all against the echo floor, per W, transport and T"""

    cluster_flags = ("dtype", "device", "gpus_per_worker", "placement_strategy", "worker_timeout_s")
    workers: str = opt("1,2,4", "expert-worker counts W, comma-separated")
    transports: str = opt("object_ref,channel,gloo", f"transports, comma-separated ({', '.join(TRANSPORTS)})")
    tokens: str = opt("8,64", "tokens per step T, comma-separated")
    iters: int = opt(30, "timed calls per layer")
    warmup: int = opt(5, "untimed calls per layer first (the first creates the RDT group)")
    seed: int = opt(0, "seed of the hidden states")


# The child side of the pipe floor: read an 8-byte length and that many bytes, write them back.
ECHO_CHILD = """
import sys
r, w = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = r.read(8)
    if len(head) < 8:
        break
    w.write(head + r.read(int.from_bytes(head, "little")))
    w.flush()
"""


def pipe_round_trip_s(nbytes: int, iters: int, warmup: int = 20) -> float:
    """Median seconds to send ``nbytes`` to a child process over an OS pipe and read them back."""
    child = subprocess.Popen([sys.executable, "-c", ECHO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    payload, out = nbytes.to_bytes(8, "little") + bytes(nbytes), child.stdout.fileno()
    try:
        seconds = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            child.stdin.write(payload)
            child.stdin.flush()
            got = 0
            while got < len(payload):
                got += len(os.read(out, len(payload) - got))
            if i >= warmup:
                seconds.append(time.perf_counter() - t0)
        return statistics.median(seconds)
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def time_runs(worker: ExpertWorker, jobs: list[tuple], iters: int, warmup: int) -> list[list[float]]:
    """Inside an expert worker (``__ray_call__``): seconds of its ``run`` for each job."""
    with torch.inference_mode():
        return [h.time_calls(lambda j=j: worker.run(*j), iters, warmup=warmup) for j in jobs]


Case = tuple[int, torch.Tensor, Routing]  # (layer, post-attention-norm hidden states [T, hidden], their routing)


def measure(model: MixtralModel, tokens: list[int], iters: int, warmup: int, seed: int) -> list[dict[str, Any]]:
    """Inside the frontend actor (``LLM.apply_model``): one row per T (see the module docstring)."""
    client = model.experts
    transport = client.transport
    assert isinstance(transport, RemoteTransport)
    rows = []
    for t in tokens:
        cases = layer_cases(model, t, seed)
        seconds = time_exchanges(client, transport, cases, iters, warmup)
        rows.append(row_of(client, t, cases, seconds, worker_compute(client, transport, cases, iters, warmup)))
    return rows


def layer_cases(model: MixtralModel, t: int, seed: int) -> list[Case]:
    """One case per layer: ``t`` random hidden states through its post-attention norm and its gate's routing."""
    g = torch.Generator().manual_seed(seed + t)
    cases = []
    with torch.inference_mode():
        for i, layer in enumerate(model.layers):
            assert isinstance(layer, DecoderLayer)
            x = torch.randn(t, model.config.hidden_size, generator=g).to(model.device, model.dtype)
            x = layer.post_attention_layernorm(x)
            cases.append((i, x, route(x, layer.block_sparse_moe.gate, layer.block_sparse_moe.top_k)))
    return cases


def time_exchanges(
    client: ExpertClient, transport: RemoteTransport, cases: list[Case], iters: int, warmup: int
) -> dict[str, list[list[float]]]:
    """Seconds of each case's ``forward``, its ``echo`` (workers send the rows back unchanged) and an ``empty``
    message to every worker, interleaved, per kind and case, after ``warmup`` untimed rounds."""
    none = torch.zeros(0, dtype=torch.int64)
    empty = [WorkerMessage(w, none, none, none, torch.zeros(0)) for w in range(len(transport.handles))]
    seconds: dict[str, list[list[float]]] = {k: [[] for _ in cases] for k in ("forward", "echo", "empty")}
    for it in range(warmup + iters):
        for i, case in enumerate(cases):
            for kind in ("forward", "echo", "empty"):
                transport.echo = kind == "echo"
                t0 = time.perf_counter()
                if kind == "empty":
                    client.exchange(case[0], case[1], empty)
                else:
                    client.forward(*case)
                if it >= warmup:
                    seconds[kind][i].append(time.perf_counter() - t0)
    transport.echo = False
    return seconds


def worker_compute(
    client: ExpertClient, transport: RemoteTransport, cases: list[Case], iters: int, warmup: int
) -> list[list[float]]:
    """Per case, the median compute seconds of each worker that has rows in it (timed inside the worker)."""
    per_layer: list[list[float]] = [[] for _ in cases]
    for w, handle in enumerate(list(transport.handles)):
        jobs, where = [], []
        for i, (layer, x, routing) in enumerate(cases):
            for m in dispatch.plan(routing, client.placement.worker_tensor(layer)):
                if m.worker == w:
                    jobs.append((layer, x[m.tokens], m.rows, m.experts, m.weights))
                    where.append(i)
        for i, ts in zip(where, ray.get(handle.__ray_call__.remote(time_runs, jobs, iters, warmup)), strict=True):
            per_layer[i].append(statistics.median(ts))
    return per_layer


def row_of(
    client: ExpertClient, t: int, cases: list[Case], seconds: dict[str, list[list[float]]], per_layer: list[list[float]]
) -> dict[str, Any]:
    """The row of one T: means over the layers of the median timings, the overheads and ratios, message sizes."""
    fwd, back, nothing = (
        statistics.fmean(statistics.median(v) for v in seconds[k]) for k in ("forward", "echo", "empty")
    )
    csum, cmax = statistics.fmean(sum(v) for v in per_layer), statistics.fmean(max(v) for v in per_layer)
    sizes = [
        sum(len(m.tokens) * x.shape[1] * x.element_size() for m in client.plan(layer, routing))
        for layer, x, routing in cases
    ]
    return {
        "tokens": t,
        "forward_s": fwd,
        "echo_s": back,
        "empty_s": nothing,
        "compute_sum_s": csum,
        "compute_max_s": cmax,
        "overhead_s": fwd - cmax,
        "overhead_over_echo": h.ratio(fwd - cmax, back),
        "forward_over_compute_plus_echo": h.ratio(fwd, csum + back),
        "strict": h.ratio(fwd, cmax + back),  # with perfectly parallel workers
        "messages_per_layer": statistics.fmean(len(client.plan(c[0], c[2])) for c in cases),
        "bytes_each_way": round(statistics.fmean(sizes)),  # rows of x per layer (replies are the same size)
        "frontend_threads": torch.get_num_threads(),
    }


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
                c = RemoteFrontend.start(config, progress=False)
                try:
                    job = functools.partial(measure, tokens=tokens, iters=o.iters, warmup=o.warmup, seed=o.seed)
                    timed = c.apply(lambda rt, job=job: job(rt.frontend.model))
                finally:
                    c.shutdown()
                r(f"W={w} {transport}: the pipe floor of each T's bytes")
                for row in timed:
                    pipe = pipe_round_trip_s(row["bytes_each_way"], max(o.iters, 50))
                    over = {"pipe_s": pipe, "overhead_over_floor": h.ratio(row["overhead_s"], pipe)}
                    rows.append({"workers": w, "transport": transport, **row, **over})
    goals = []
    for transport in transports:
        worst = max((x for x in rows if x["transport"] == transport), key=lambda x: x["forward_over_compute_plus_echo"])
        text = f"dispatch ({transport}) forward <= 1.3x (compute + echo floor)"
        note = f"worst case W={worst['workers']} T={worst['tokens']}"
        goals.append(h.goal(text, worst["forward_over_compute_plus_echo"], 1.3, at_least=False, note=note))
    channel = [x for x in rows if x["transport"] == "channel"]
    if channel:
        worst = max(channel, key=lambda x: x["overhead_over_floor"] or 0.0)
        note = f"worst case W={worst['workers']} T={worst['tokens']}"
        text = "dispatch (channel) overhead <= 3x the pipe round trip of the same bytes"
        goals.append(h.goal(text, worst["overhead_over_floor"], 3.0, at_least=False, note=note))
        at2 = [x for x in channel if x["workers"] == 2]
        if at2:
            worst2 = max(at2, key=lambda x: x["overhead_s"])
            note = f"worst case T={worst2['tokens']}"
            goals.append(
                h.goal(
                    "dispatch (channel) overhead at W=2 <= 0.3 ms",
                    worst2["overhead_s"] * 1e3,
                    0.3,
                    at_least=False,
                    note=note,
                )
            )
    ms = [{**x, **{k[:-2] + "_ms": x[k] * 1e3 for k in x if k.endswith("_s")}} for x in rows]
    cols = ["workers", "tokens", "transport", "bytes_each_way", "pipe_ms", "empty_ms", "echo_ms", "forward_ms"]
    cols += ["compute_max_ms", "overhead_ms", "overhead_over_floor", "forward_over_compute_plus_echo", "strict"]
    title = (
        "one layer's all-to-all per call (pipe: raw OS pipe round trip of the same bytes; empty: an empty message to "
        "every worker; overhead = forward - slowest worker's compute; strict: forward / (compute_max + echo))"
    )
    tables = [h.table(ms, cols, title=title)]
    settings = {"cluster": cluster}
    return r.finish(settings=settings, method=__doc__, results={"rows": rows}, goals=goals, tables=tables)
