"""``mixserve bench dispatch``: the cost of one layer's all-to-all on the sharded path against its floor.

For each W (expert workers), transport (object_ref, gloo) and T (tokens in the step), one layer's
``experts.run_layer(layer, x, messages)`` is timed from inside a small frontend-like actor, beside

- compute: the same ``ExpertShard.run`` calls, timed inside each worker process on its own shard (no transport);
- echo floor: the same round trip to the same actors with the same payloads through the same client code, but
  calling ``ExpertWorker.echo`` (returns x, no compute) instead of ``run``.

dispatch overhead = run_layer - compute; ratios overhead / echo and run_layer / (compute + echo).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cluster.bench import common

TRANSPORTS = ("object_ref", "gloo")


@dataclass(frozen=True)
class DispatchBenchSettings:
    model: str
    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    transports: list[str] = field(default_factory=lambda: list(TRANSPORTS))
    tokens: list[int] = field(default_factory=lambda: [8, 64])
    iters: int = 30
    warmup: int = 5
    seed: int = 0


# ---------------------------------------------------------------------- cases (no Ray)
@dataclass(frozen=True)
class Case:
    """One layer's input: normalised hidden states x [T, D] and the messages its real gate routes them into."""

    layer: int
    x: torch.Tensor
    messages: list


def make_cases(model: str, placement: Any, tokens: int, seed: int) -> list[Case]:
    """One case per layer: random hidden states, routed by that layer's checkpoint gate, planned over ``placement``."""
    from cluster.checkpoint import LoadRole, load_tensors
    from cluster.config import ModelConfig
    from router import dispatch
    from router.gate import route
    from workers.layers import rms_norm

    cfg = ModelConfig.from_dir(model)
    t = load_tensors(model, cfg, role=LoadRole.frontend(), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(seed + tokens)
    cases = []
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        x = rms_norm(torch.randn(tokens, cfg.hidden_size, generator=g), t[p + "post_attention_layernorm.weight"], 1e-5)
        routing = route(x, t[p + "block_sparse_moe.gate.weight"], cfg.top_k)
        cases.append(Case(layer, x, dispatch.plan(routing, placement.worker_tensor(layer))))
    return cases


def payload_bytes(case: Case) -> dict[str, int]:
    """Bytes one layer sends (rows of x plus rows/experts/weights) and receives (one partial per message)."""

    def nb(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    d, es = case.x.shape[1], case.x.element_size()
    sent = sum(len(m.tokens) * d * es + nb(m.rows) + nb(m.experts) + nb(m.weights) for m in case.messages)
    received = sum(len(m.tokens) * d * es for m in case.messages)
    return {"sent": sent, "received": received, "messages": len(case.messages)}


# ---------------------------------------------------------------------- inside the actors
def _time_shard_runs(worker: Any, jobs: list[tuple], iters: int, warmup: int) -> list[list[float]]:
    """Runs inside an ExpertWorker (via ``__ray_call__``): seconds of ``worker.shard.run`` for each job."""
    out = []
    with torch.inference_mode():
        for job in jobs:
            out.append(common.time_calls(lambda job=job: worker.shard.run(*job), iters, warmup=warmup))
    return out


class _EchoHandle:
    """An expert-worker handle whose ``run*`` methods are the worker's ``echo*`` ones (``run`` -> ``echo``,
    ``run_wire`` -> ``echo_wire``): the client code stays exactly the same, only the compute is left out."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getattr__(self, name: str) -> Any:
        if name == "_handle":  # not set yet (never pickled, but keep getattr from recursing)
            raise AttributeError(name)
        if name.startswith("run"):
            return getattr(self._handle, "echo" + name[3:])
        return getattr(self._handle, name)


class BenchFrontend:
    """A frontend-like actor (same resources as the real one: 1 CPU) that hosts an expert client and times it.

    For RDT it has the ``rdt_stage``/``rdt_absorb`` hooks RdtExperts calls on its own actor, like FrontendActor.
    """

    def __init__(self, handles: list, transport: str, timeout_s: float = 60.0) -> None:
        from router.transport import RayExperts

        self.transport = transport
        self.real = list(handles)
        self.echo = [_EchoHandle(h) for h in handles]
        if transport == "object_ref":
            self.experts: Any = RayExperts(self.real, timeout_s=timeout_s)
        else:
            from router.rdt import RdtExperts

            self.experts = RdtExperts(self.real, backend=transport, timeout_s=timeout_s)

    def rdt_stage(self, key: int):
        return self.experts.stage(key)

    def rdt_absorb(self, key: int, partial) -> bool:
        return self.experts.absorb(key, partial)

    def _call(self, case: Case, echo: bool) -> float:
        self.experts.handles = self.echo if echo else self.real
        try:
            t0 = time.perf_counter()
            self.experts.run_layer(case.layer, case.x, case.messages)
            return time.perf_counter() - t0
        finally:
            self.experts.handles = self.real

    def measure(self, cases: list[Case], iters: int, warmup: int) -> dict[str, list[list[float]]]:
        """Per case: seconds of ``iters`` run_layer calls and of ``iters`` echo round trips, interleaved."""
        for _ in range(warmup):  # the first run also creates the RDT collective group
            for c in cases:
                self._call(c, echo=False)
                self._call(c, echo=True)
        run = [[] for _ in cases]
        echo = [[] for _ in cases]
        for _ in range(iters):
            for i, c in enumerate(cases):
                run[i].append(self._call(c, echo=False))
                echo[i].append(self._call(c, echo=True))
        return {"run": run, "echo": echo}

    def threads(self) -> int:
        return torch.get_num_threads()


# ---------------------------------------------------------------------- driver side
def _median_mean(per_case: list[list[float]]) -> float:
    """Mean over cases (layers) of each case's median seconds."""
    return statistics.fmean(statistics.median(v) for v in per_case)


def measure_compute(handles: list, cases: list[Case], iters: int, warmup: int) -> dict[str, float]:
    """Each message's ``ExpertShard.run`` timed inside its own worker, one worker at a time (no contention)."""
    import ray

    per_case_workers: list[list[float]] = [[] for _ in cases]
    for w, h in enumerate(handles):
        jobs, where = [], []
        for i, c in enumerate(cases):
            for m in c.messages:
                if m.worker == w:
                    jobs.append((c.layer, c.x[m.tokens], m.rows, m.experts, m.weights))
                    where.append(i)
        if not jobs:
            continue
        times = ray.get(h.__ray_call__.remote(_time_shard_runs, jobs, iters, warmup))
        for i, t in zip(where, times, strict=True):
            per_case_workers[i].append(statistics.median(t))
    return {
        "compute_sum_s": statistics.fmean(sum(v) for v in per_case_workers),
        "compute_max_s": statistics.fmean(max(v) for v in per_case_workers),
    }


def start_bench_frontend(handles: list, transport: str) -> Any:
    import ray

    actor_cls = ray.remote(enable_tensor_transport=True)(BenchFrontend)
    return actor_cls.options(num_cpus=1, max_concurrency=8).remote(handles, transport)


def bench_transport(actor: Any, cases: list[Case], s: DispatchBenchSettings) -> dict[str, Any]:
    import ray

    times = ray.get(actor.measure.remote(cases, s.iters, s.warmup))
    return {
        "run_layer_s": _median_mean(times["run"]),
        "run_layer_min_s": statistics.fmean(min(v) for v in times["run"]),
        "echo_s": _median_mean(times["echo"]),
        "echo_min_s": statistics.fmean(min(v) for v in times["echo"]),
        "frontend_threads": ray.get(actor.threads.remote()),
    }


def derive(row: dict[str, Any]) -> dict[str, Any]:
    """Overhead and the ratios against the floor (serial compute, and the strict variant with parallel compute)."""
    run, echo, csum, cmax = row["run_layer_s"], row["echo_s"], row["compute_sum_s"], row["compute_max_s"]
    overhead = run - csum
    return {
        **row,
        "overhead_s": overhead,
        "overhead_over_echo": common.ratio(overhead, echo),
        "run_over_compute_plus_echo": common.ratio(run, csum + echo),
        "run_over_parallel_compute_plus_echo": common.ratio(run, cmax + echo),
    }


def bench_workers(n_workers: int, s: DispatchBenchSettings, progress: common.Progress) -> list[dict[str, Any]]:
    import ray
    from ray.util.placement_group import remove_placement_group

    from cluster.cluster import WorkerResources, start_workers
    from cluster.config import ModelConfig
    from cluster.placement import ExpertPlacement

    cfg = ModelConfig.from_dir(s.model)
    placement = ExpertPlacement.contiguous(
        num_layers=cfg.num_layers, num_experts=cfg.num_experts, num_workers=n_workers
    )
    progress(f"W={n_workers}: starting expert workers")
    pg, handles = start_workers(
        model=s.model,
        config=cfg,
        placement=placement,
        dtype="float32",
        resources=WorkerResources(gpus_per_worker=0.0, frontend_gpus=0.0),
        frontend_bundle=False,
    )
    rows = []
    try:
        cases = {t: make_cases(s.model, placement, t, s.seed) for t in s.tokens}
        compute = {}
        for t in s.tokens:
            progress(f"W={n_workers} T={t}: compute inside the workers")
            compute[t] = measure_compute(handles, cases[t], s.iters, s.warmup)
        # object_ref first: once workers joined an RDT group they cannot join another one reliably, so one
        # frontend per transport serves every T.
        for transport in sorted(s.transports, key=TRANSPORTS.index):
            actor = start_bench_frontend(handles, transport)
            try:
                for t in s.tokens:
                    progress(f"W={n_workers} T={t}: {transport} run_layer and echo")
                    timing = bench_transport(actor, cases[t], s)
                    row = {"workers": n_workers, "tokens": t, "transport": transport, **compute[t], **timing}
                    rows.append(derive({**row, "payload_layer0": payload_bytes(cases[t][0])}))
            finally:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                ray.kill(h, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(pg)
    return rows


METHOD = (
    "All times are per layer call, median over iterations, averaged over the model's layers (each layer has its "
    "own routing from its checkpoint gate over random normalised hidden states x [T, D]). run_layer: "
    "experts.run_layer(layer, x, messages) timed inside a 1-CPU frontend-like actor hosting the real client "
    "(router.transport.RayExperts for object_ref; router.rdt.RdtExperts for gloo, with the same rdt_stage/"
    "rdt_absorb hooks as FrontendActor). echo floor: the same client code, the same actors and payloads, with "
    "each worker's run replaced by ExpertWorker.echo (for gloo, through the same stage/absorb RDT path with "
    "tensor_transport). compute: each message's ExpertShard.run timed inside its own worker process (same shard, "
    "same threads, no transport), one worker at a time; compute_sum adds the workers (what the in-process path "
    "does; on a machine with fewer free cores than workers it is the critical path), compute_max takes the "
    "slowest worker (perfect parallelism, the strict variant). overhead = run_layer - compute_sum. The goal uses "
    "run_layer / (compute_sum + echo), worst case over W and T per transport."
)


def goals_of(rows: list[dict[str, Any]], transports: list[str]) -> list[dict]:
    out = []
    for tr in transports:
        mine = [r for r in rows if r["transport"] == tr]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["run_over_compute_plus_echo"])
        note = f"worst case W={worst['workers']} T={worst['tokens']}"
        out.append(
            common.goal(
                f"dispatch ({tr}) run_layer <= 1.3x (compute + echo floor)",
                worst["run_over_compute_plus_echo"],
                1.3,
                at_least=False,
                note=note,
            )
        )
    return out


def table_of(rows: list[dict[str, Any]]) -> str:
    ms = 1e3
    return common.table(
        ["W", "T", "transport", "run ms", "compute ms", "echo ms", "overhead ms", "ovh/echo", "run/(c+e)", "strict"],
        [
            (
                r["workers"],
                r["tokens"],
                r["transport"],
                r["run_layer_s"] * ms,
                r["compute_sum_s"] * ms,
                r["echo_s"] * ms,
                r["overhead_s"] * ms,
                r["overhead_over_echo"],
                r["run_over_compute_plus_echo"],
                r["run_over_parallel_compute_plus_echo"],
            )
            for r in rows
        ],
        title="one layer's all-to-all (per call; strict = run / (slowest worker's compute + echo))",
    )


def run_dispatch_bench(s: DispatchBenchSettings, *, out: str | None = None, quiet: bool = False) -> dict:
    import ray

    progress = common.Progress("dispatch", quiet=quiet)
    machine = common.machine_info()
    started = common.init_ray(max(s.workers) + 2)
    try:
        rows = [r for w in s.workers for r in bench_workers(w, s, progress)]
    finally:
        if started:
            ray.shutdown()
    machine.update(common.end_probes(progress))
    payload = common.report(
        "dispatch",
        settings=asdict(s),
        method=METHOD,
        results={"rows": rows},
        goals=goals_of(rows, s.transports),
        machine=machine,
    )
    common.finish(payload, out, [table_of(rows)])
    return payload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dispatch", help="one layer's all-to-all against the echo floor, per W, transport and T")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench model, made once)")
    p.add_argument("--workers", type=common.int_list, default=[1, 2, 4])
    p.add_argument("--transports", type=common.str_list, default=list(TRANSPORTS), help="object_ref,gloo")
    p.add_argument("--tokens", type=common.int_list, default=[8, 64], help="tokens per step")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    p.set_defaults(func=main)


def main(a: argparse.Namespace) -> int:
    bad = [t for t in a.transports if t not in TRANSPORTS]
    if bad:
        raise SystemExit(f"mixserve bench dispatch: unknown transport {bad[0]!r}; use {', '.join(TRANSPORTS)}")
    s = DispatchBenchSettings(
        model=common.resolve_model(a.model),
        workers=a.workers,
        transports=a.transports,
        tokens=a.tokens,
        iters=max(1, a.iters),
        warmup=max(1, a.warmup),
        seed=a.seed,
    )
    run_dispatch_bench(s, out=a.out, quiet=a.quiet)
    return 0
