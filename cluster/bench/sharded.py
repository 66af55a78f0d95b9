"""``mixserve bench sharded``: the decode step of the sharded model against the in-process one (W = 0).

Offline, on the bench model: for each W (0 first: the baseline) and transport a frontend is built (W = 0:
``build_frontend`` in this process; W >= 1: the offline API's sharded cluster, measured inside its frontend actor
through ``RemoteFrontend.apply``). Per setting, ``EngineCore.generate`` runs ``batch`` random prompts of ``prompt_len``
tokens to ``new_tokens`` greedy tokens each (EOS ignored), after one untimed warm-up run (W = 0 with
``baseline_threads`` torch threads, by default the one thread the frontend actor gets from its Ray CPU); the engine's
executor is wrapped only to time each call. decode step = median executor call over the full-batch decode steps of every
repeat (the forward pass with its dispatch; the scheduler and sampler are the same code for every W). Two micro-batches
in flight (``overlap``) are switched on the running frontend (``ExpertClient.overlap_min_batch``: ``batch`` when on,
0 when off), so both settings share a cluster. ratio = decode step / W = 0's decode step. Every setting must give
W = 0's tokens (``same_tokens``). Per decode step also: worker compute = the slowest worker's ``run_packed`` time
within the step (the workers log (start, seconds) of each call on the node's monotonic clock, the one
``time.perf_counter`` reads in every process), frontend compute = the step less the frontend's waits for replies
(``ExpertClient.waited_s``). The overlap goal (W = 1): the step with overlap against max(frontend compute, worker
compute) of the step without it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.config.transports import NAMES as TRANSPORTS
from cluster.engine.sampling import SamplingParams
from cluster.engine.step import StepBatch, StepOutput
from cluster.runtime.frontend import Frontend, build_frontend
from cluster.runtime.offline import RemoteFrontend
from cluster.runtime.runtime import FrontendRuntime


@dataclass
class Options(Common):
    """decode step of the sharded model vs in-process (W=0), offline, decode batch 32, overlap on and off"""

    cluster_flags = ("dtype", "device", "gpus_per_worker", "placement_strategy", "max_num_seqs", "max_model_len")
    cluster_defaults = {"max_num_seqs": 32, "max_model_len": 1024, "device": "cpu"}
    workers: str = opt("0,1,2,4", "expert-worker counts W, comma-separated (0: the in-process baseline)")
    transports: str = opt("channel,object_ref", f"transports for W >= 1, comma-separated ({', '.join(TRANSPORTS)})")
    overlap: str = opt("on,off", "two micro-batches in flight: on, off or both")
    batch: int = opt(32, "sequences decoded together")
    prompt_len: int = opt(16, "prompt tokens per sequence")
    new_tokens: int = opt(32, "output tokens per sequence")
    repeats: int = opt(2, "timed runs per setting")
    baseline_threads: int = opt(
        1, "torch threads of the W=0 baseline (1: as the frontend actor's 1 Ray CPU; 0: torch's)"
    )
    seed: int = opt(0, "seed of the prompts")


class StepTimer:
    """The engine's executor, unchanged, with each call timed (and the time it spent waiting for expert replies)."""

    def __init__(self, runner: Any, experts: Any) -> None:
        self.runner, self.experts = runner, experts
        self.calls: list[tuple[int, int, float, float, float]] = []  # (tokens, sequences, start, end, waited)

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def block_size(self) -> int:
        return self.runner.block_size

    def routed_experts(self, blocks: Sequence[int]) -> torch.Tensor:
        return self.runner.routed_experts(blocks)

    def execute(self, batch: StepBatch) -> StepOutput:
        waited = self.experts.waited_s
        t0 = time.perf_counter()
        out = self.runner.execute(batch)
        h.sync()
        t1 = time.perf_counter()
        self.calls.append((batch.num_tokens, len(batch.chunks), t0, t1, self.experts.waited_s - waited))
        return out


def measure(
    fe: Frontend, prompts: list[list[int]], new_tokens: int, repeats: int, overlap: int, workers: list | None = None
) -> dict[str, Any]:
    """In the frontend's process: decode-step seconds over ``repeats`` timed runs, and the tokens. With the workers'
    handles also, per decode step: the slowest worker's compute (its ``run_packed`` calls within the step) and the
    frontend's own compute (the step less its waits for replies)."""
    experts, core = fe.experts, fe.core
    experts.overlap_min_batch = overlap
    timer = StepTimer(core.executor, experts)
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)] * len(prompts)
    core.executor = timer
    try:
        core.generate(prompts, params)  # warm-up (and, over channels, the graph's compilation)
        timer.calls.clear()
        if workers:
            ray.get([w.take_compute_log.remote() for w in workers])
        before = fe.model.micro_batched_steps
        outs = []
        for _ in range(repeats):
            outs = core.generate(prompts, params)
        split = fe.model.micro_batched_steps - before
    finally:
        core.executor = timer.runner
    logs = ray.get([w.take_compute_log.remote() for w in workers]) if workers else []
    decode = [(t0, t1, waited) for tokens, seqs, t0, t1, waited in timer.calls if tokens == seqs == len(prompts)]
    row: dict[str, Any] = {
        "decode_step_s": statistics.median(t1 - t0 for t0, t1, _ in decode),
        "decode_step_min_s": min(t1 - t0 for t0, t1, _ in decode),
        "decode_steps": len(decode),
        "split_steps": split,
        "frontend_threads": torch.get_num_threads(),
        "tokens": [o.token_ids for o in outs],
    }
    if logs:
        busy = [max(sum(d for s, d in log if t0 <= s < t1) for log in logs) for t0, t1, _ in decode]
        row["worker_compute_s"] = statistics.median(busy)
        row["frontend_compute_s"] = statistics.median(t1 - t0 - waited for t0, t1, waited in decode)
    return row


def measure_in_actor(runtime: FrontendRuntime, *args: Any) -> dict[str, Any]:
    """:func:`measure` inside the frontend actor (``RemoteFrontend.apply``)."""
    return measure(runtime.frontend, *args, workers=list(runtime.pool.handles if runtime.pool else []))


def run(o: Options, cluster: dict[str, Any]) -> dict:
    transports, modes, workers = choices(o)
    r = h.Run("sharded", o)
    model = h.model_dir(o.model)
    cfg = ModelConfig.from_dir(model)
    rng = random.Random(o.seed)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(o.prompt_len)] for _ in range(o.batch)]
    args = (prompts, o.new_tokens, o.repeats)
    r(f"W=0: in-process baseline, batch {o.batch}, {o.new_tokens} new tokens")
    base = baseline(o, ClusterConfig.create(model=model, **cluster), args)
    rows = [{"workers": 0, "transport": "in-process", "overlap": "-", **base}]
    with h.local_ray(max(workers, default=0) + 2):
        for w in workers:
            for transport in transports:
                config = ClusterConfig.create(model=model, expert_workers=w, transport=transport, **cluster)
                r(f"W={w} {transport}: starting the cluster, then overlap {o.overlap}")
                rows += sharded_rows(config, args, o.batch, modes)
    for x in rows:
        x["ratio_to_w0"] = h.ratio(x["decode_step_s"], base["decode_step_s"])
        x["same_tokens"] = x.pop("tokens") == base["tokens"]
        x.update({k[:-2] + "_ms": v * 1e3 for k, v in list(x.items()) if k.endswith("_s")})
    cols = ["workers", "transport", "overlap", "decode_step_ms", "decode_step_min_ms", "ratio_to_w0"]
    cols += ["frontend_compute_ms", "worker_compute_ms", "decode_steps", "split_steps", "frontend_threads"]
    cols += ["same_tokens"]
    title = f"decode step at batch {o.batch} (median executor call; ratio to the in-process W=0 step)"
    settings = {"cluster": cluster}
    return r.finish(
        settings=settings,
        method=__doc__,
        results={"rows": rows},
        goals=goals_of(rows, transports),
        tables=[h.table(rows, cols, title=title)],
    )


def choices(o: Options) -> tuple[list[str], list[str], list[int]]:
    """The transports, overlap modes and W >= 1 the flags name (W = 0, the baseline, always runs); a bad value
    exits with a message."""
    transports = [t.strip() for t in o.transports.split(",") if t.strip()]
    if not transports or set(transports) - set(TRANSPORTS):
        raise SystemExit(f"mixserve bench sharded: --transports takes {', '.join(TRANSPORTS)}, not {o.transports!r}")
    modes = [m.strip() for m in o.overlap.split(",") if m.strip()]
    if not modes or set(modes) - {"on", "off"}:
        raise SystemExit(f"mixserve bench sharded: --overlap takes on, off or on,off, not {o.overlap!r}")
    sharded = [x.strip() for x in o.workers.split(",") if x.strip() and x.strip() != "0"]
    return transports, modes, h.ints(",".join(sharded), "workers") if sharded else []


def baseline(o: Options, config: ClusterConfig, args: tuple[list[list[int]], int, int]) -> dict[str, Any]:
    """:func:`measure` of W = 0 in this process, with ``--baseline-threads`` torch threads (0: as many as now)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(o.baseline_threads or threads)
    try:
        return measure(build_frontend(config, progress=False), *args, 0)
    finally:
        torch.set_num_threads(threads)


def sharded_rows(
    config: ClusterConfig, args: tuple[list[list[int]], int, int], batch: int, modes: list[str]
) -> list[dict[str, Any]]:
    """One sharded cluster of ``config``: :func:`measure` in its frontend actor per overlap mode (on: micro-batches
    from ``batch`` rows), then the cluster shut down."""
    w, transport = config.parallel.expert_workers, config.parallel.transport
    rows = []
    c = RemoteFrontend.start(config, progress=False)
    try:
        for mode in modes:
            overlap = batch if mode == "on" else 0
            got: dict[str, Any] = c.apply(lambda rt, overlap=overlap: measure_in_actor(rt, *args, overlap))
            rows.append({"workers": w, "transport": transport, "overlap": mode, **got})
    finally:
        c.shutdown()
    return rows


def goals_of(rows: list[dict[str, Any]], transports: list[str]) -> list[dict]:
    """Per transport: the best W = 2 decode step against W = 0's, and at W = 1 the step with overlap against
    max(frontend compute, worker compute) of the step without it."""
    goals = []
    for transport in transports:
        at2 = [x for x in rows if x["workers"] == 2 and x["transport"] == transport]
        if at2:
            best = min(at2, key=lambda x: x["decode_step_s"])
            text = f"sharded W=2 ({transport}) decode step <= 1.1x W=0"
            goals.append(h.goal(text, best["ratio_to_w0"], 1.1, at_least=False, note=f"overlap {best['overlap']}"))
    for transport in transports:
        on = next((x for x in rows if (x["workers"], x["transport"], x["overlap"]) == (1, transport, "on")), None)
        off = next((x for x in rows if (x["workers"], x["transport"], x["overlap"]) == (1, transport, "off")), None)
        if on and off:
            bound = max(off["frontend_compute_s"], off["worker_compute_s"])
            text = f"overlap ({transport}, W=1) decode step <= 1.15x max(frontend compute, worker compute)"
            note = (
                f"max of {off['frontend_compute_s'] * 1e3:.3g} and {off['worker_compute_s'] * 1e3:.3g} ms (overlap off)"
            )
            goals.append(h.goal(text, h.ratio(on["decode_step_s"], bound), 1.15, at_least=False, note=note))
    return goals
