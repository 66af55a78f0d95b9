"""The expert-sharded cluster on Ray: a placement group, W expert workers, the expert client that reaches them,
and (for the offline API) a frontend actor.

Resources come only from Ray: each worker's bundle asks ``gpus_per_worker`` GPUs when the cluster has GPUs, and
each actor uses whatever GPU Ray assigned it (never a hard-coded device id).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.builder import ClusterConfig, build_frontend
from cluster.engine import RequestOutput
from cluster.errors import ExpertWorkerError, PlacementError
from cluster.placement import ExpertPlacement, WorkerResources, interleave_nodes, resolve_resources
from cluster.sampling import SamplingParams
from router.channel import ChannelExperts
from router.client import ExpertClient
from router.object_ref import RayExperts
from router.rdt import RdtExperts
from workers.expert_worker import ExpertWorker, use_assigned_cpus

FRONTEND_BUNDLE = 0


def cluster_resources(config: ClusterConfig) -> WorkerResources:
    gpus = resolve_resources(
        expert_workers=config.expert_workers,
        gpus_per_worker=config.gpus_per_worker,
        total_gpus=float(ray.cluster_resources().get("GPU", 0)),
    )
    return dataclasses.replace(gpus, cpus_per_worker=config.cpus_per_worker, frontend_cpus=config.frontend_cpus)


def reserve(bundles: list[dict[str, float]], *, strategy: str, timeout_s: float = 120.0) -> PlacementGroup:
    """A ready placement group; fails at once when the cluster can never hold the bundles, after ``timeout_s``
    (saying what is free) when it is busy."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    total = ray.cluster_resources()
    short = {k: v for k, v in need.items() if total.get(k, 0.0) < v}
    if short:
        have = {k: total.get(k, 0.0) for k in short}
        raise PlacementError(
            f"the Ray cluster can never hold {len(bundles)} bundles {bundles}: needs {short}, has {have}"
        )
    pg = placement_group(bundles, strategy=strategy, name=f"mixserve-{time.time_ns()}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except Exception as e:
        remove_placement_group(pg)
        free = ray.available_resources()
        raise PlacementError(
            f"could not reserve {len(bundles)} bundles {bundles} with strategy {strategy} within "
            f"{timeout_s:.0f}s ({type(e).__name__}); free now: "
            f"{ {k: free.get(k, 0.0) for k in need} } - other actors hold the rest"
        ) from None
    return pg


def spawn_worker(
    *,
    pg: PlacementGroup,
    bundle: int,
    config: ClusterConfig,
    worker: int,
    placement: ExpertPlacement,
    resources: WorkerResources,
    name: str | None = None,
) -> Any:
    """One expert-worker actor in its placement-group bundle. It loads its own experts and restarts forever
    (``max_restarts=-1``); calls in flight when it dies fail (no retries)."""
    return (
        # ray.remote's typed overloads predate enable_tensor_transport (RDT); the call is what Ray documents.
        ray.remote(enable_tensor_transport=True)(ExpertWorker)  # pyright: ignore[reportCallIssue]
        .options(
            num_cpus=resources.cpus_per_worker,
            num_gpus=resources.gpus_per_worker,
            max_restarts=-1,
            max_task_retries=0,
            name=name,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle
            ),
        )
        .remote(model=config.model, worker=worker, experts=placement.experts_of(worker), dtype=config.dtype)
    )


@dataclass
class Workers:
    """The expert workers of one frontend: ``handles[w]`` runs in bundle ``bundles[w]`` of ``pg``."""

    resources: WorkerResources
    pg: PlacementGroup
    handles: list
    bundles: list[int]


def worker_bundles(pg: PlacementGroup, *, offset: int, count: int, replicas: int) -> list[int]:
    """The bundle of each worker: in order, or (copies of experts) ordered so that neighbouring workers, which
    hold an expert's copies, sit on different nodes when the group spans several."""
    bundles = list(range(offset, offset + count))
    if replicas == 1:
        return bundles
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    return [bundles[i] for i in interleave_nodes([str(nodes[b]) for b in bundles])]


def launch_workers(
    config: ClusterConfig,
    *,
    placement: ExpertPlacement,
    frontend_bundle: bool,
    name_prefix: str | None = None,
    load_timeout_s: float = 1800.0,
) -> Workers:
    """Reserve the placement group and start one worker per bundle; returns once every worker has its experts.

    Bundle 0 is the frontend's when ``frontend_bundle``; the workers take the next W bundles.
    """
    resources = cluster_resources(config)
    bundles = []
    if frontend_bundle:
        bundles.append(
            {"CPU": resources.frontend_cpus, **({"GPU": resources.frontend_gpus} if resources.frontend_gpus else {})}
        )
    for _ in range(placement.num_workers):
        gpu = {"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}
        bundles.append({"CPU": resources.cpus_per_worker, **gpu})
    pg = reserve(bundles, strategy=config.placement_strategy)
    order = worker_bundles(
        pg, offset=1 if frontend_bundle else 0, count=placement.num_workers, replicas=placement.replicas
    )
    handles = [
        spawn_worker(
            pg=pg,
            bundle=order[w],
            config=config,
            worker=w,
            placement=placement,
            resources=resources,
            name=f"{name_prefix}{w}" if name_prefix else None,
        )
        for w in range(placement.num_workers)
    ]
    try:
        ray.get([h.ping.remote() for h in handles], timeout=load_timeout_s)  # workers load their experts
    except Exception:
        for h in handles:
            ray.kill(h, no_restart=True)
        remove_placement_group(pg)
        raise
    return Workers(resources=resources, pg=pg, handles=handles, bundles=order)


GPU_OVERLAP_MIN_BATCH = 256


def overlap_min_batch(config: ClusterConfig) -> int:
    """``config.overlap_min_batch``, or when None: 256 tokens with GPU workers, else 0 (off).

    Each micro-batch reads every weight it touches once more, so the split pays only where a step is not bound by
    weight reads. Measured on the 2-core CPU box (bench model, decode batch 32 and 128, W = 1/2/4, object refs and
    channels): always slower with the split (the slowest worker's compute per step x1.5-2.3, the frontend's
    x0.9-2.3). With GPU workers the halves run on separate devices; 256 keeps each half at 128+ tokens (not
    measured: no GPU was lent)."""
    if config.overlap_min_batch is not None:
        return config.overlap_min_batch
    gpus = cluster_resources(config).gpus_per_worker > 0 and torch.cuda.is_available()
    return GPU_OVERLAP_MIN_BATCH if gpus else 0


def expert_client(config: ClusterConfig, placement: ExpertPlacement, handles: Sequence[Any]) -> ExpertClient:
    """The client for ``config.transport``, in the process that will drive it (it compiles its graph or creates
    its group there: a channel graph when the frontend is built, an RDT group on first use). RDT clients must live
    in an actor with rdt_stage / rdt_absorb. Call its ``close()`` before killing the workers."""
    common = {"timeout_s": config.worker_timeout_s, "overlap_min_batch": overlap_min_batch(config)}
    if config.transport == "object_ref":
        return RayExperts(placement, handles, **common)
    if config.transport == "channel":
        return ChannelExperts(placement, handles, **common)
    return RdtExperts(placement, handles, backend=config.transport, **common)


def health_report(placement: ExpertPlacement, workers: list[dict]) -> dict:
    """The health of a frontend's workers: ``workers`` holds one ``{"worker": w, "ok": bool, ...}`` per worker.
    ``ok`` when every expert has a copy on a worker that answered; ``missing_experts`` lists the [layer, expert]
    pairs that have none (with one copy per expert: every expert of every worker that did not answer)."""
    missing = placement.missing({w["worker"] for w in workers if w["ok"]})
    return {"ok": not missing, "workers": workers, "missing_experts": [list(p) for p in missing]}


def worker_health(worker: int, status: dict | None, error: BaseException | None = None) -> dict:
    """One worker's entry of :func:`health_report` from its ``status()`` reply, or from the error instead."""
    if error is not None or status is None:
        return {"worker": worker, "ok": False, "error": type(error).__name__ if error else "no reply"}
    return {"worker": worker, "ok": True, "load_seconds": status["load_seconds"], "pid": status["pid"]}


class FrontendActor:
    """Ray actor body for the offline API's frontend: the built frontend with an expert client over the workers."""

    def __init__(self, *, config: ClusterConfig, placement: ExpertPlacement, handles: list) -> None:
        use_assigned_cpus()
        self.frontend = build_frontend(config, experts=expert_client(config, placement, handles), progress=False)
        self._lock = threading.Lock()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        with self._lock:
            return self.frontend.core.generate(prompts, params)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        with self._lock:
            return self.frontend.core.logits(token_ids)

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            **self.frontend.info(),
            "node_id": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
        }

    def expert_load(self) -> list[list[int]]:
        return self.frontend.expert_load()

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        """Release the expert client's graph or group (before the workers are killed)."""
        self.frontend.experts.close()

    # Ray Direct Transport hooks: the frontend's own tasks that hand tensors to and from the collective group.
    def rdt_stage(self, key: int) -> torch.Tensor:
        return self._rdt().stage(key)

    def rdt_absorb(self, key: int, partial: torch.Tensor) -> bool:
        return self._rdt().absorb(key, partial)

    def _rdt(self) -> RdtExperts:
        experts = self.frontend.experts
        assert isinstance(experts, RdtExperts), "RDT hooks are called only when the transport is gloo or nccl"
        return experts


def _wait_alive(actor: Any, timeout_s: float) -> str:
    """Return alive, dead (gone for good) or unknown (still restarting when the time ran out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
            return "alive"
        except ActorDiedError:
            return "dead"
        except (ActorUnavailableError, GetTimeoutError):
            time.sleep(0.2)
    return "unknown"


class ExpertCluster:
    """A frontend actor plus its W expert workers, for the offline :class:`~cluster.llm.LLM` API.

    Ray restarts a dead worker by itself (it reloads its experts). With an RDT transport Ray also stops both
    ends of a failed transfer for good (the frontend included); :meth:`heal` then replaces whatever is gone in
    the same placement-group bundles before the next call.
    """

    def __init__(
        self,
        *,
        config: ClusterConfig,
        placement: ExpertPlacement,
        group: Workers,
        owns_ray: bool,
    ) -> None:
        self.config = config
        self.expert_placement = placement
        self.resources = group.resources
        self.pg = group.pg
        self.workers = group.handles
        self.bundles = group.bundles
        self.owns_ray = owns_ray
        self.frontend: Any = None
        self._suspect = False

    @classmethod
    def start(
        cls, config: ClusterConfig, placement: ExpertPlacement, *, address: str | None = None, progress: bool = True
    ) -> ExpertCluster:
        """Join ``address``, or use the Ray this process already started, or start a new local one (owned)."""
        owns_ray = False
        if not ray.is_initialized():
            # No address: a new local instance (not whatever `ray start` cluster happens to run here).
            ray.init(address=address or "local", log_to_driver=progress)
            owns_ray = address is None
        group = launch_workers(config, placement=placement, frontend_bundle=True)
        self = cls(config=config, placement=placement, group=group, owns_ray=owns_ray)
        try:
            self._spawn_frontend()
        except Exception:
            self.shutdown()
            raise
        return self

    def _spawn_frontend(self) -> None:
        self.frontend = (
            ray.remote(enable_tensor_transport=True)(FrontendActor)  # pyright: ignore[reportCallIssue]
            .options(
                num_cpus=self.resources.frontend_cpus,
                num_gpus=self.resources.frontend_gpus,
                max_concurrency=8,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=FRONTEND_BUNDLE
                ),
            )
            .remote(config=self.config, placement=self.expert_placement, handles=self.workers)
        )
        ray.get(self.frontend.ping.remote())

    def heal(self, timeout_s: float = 30.0) -> list[str]:
        """Replace actors that are gone for good and wait for restarting ones; returns what was replaced.

        Over RDT, Ray stops both ends of a failed transfer and survivors of the broken collective group cannot
        join a new one reliably, so every worker and the frontend are replaced (fresh processes, fresh group).
        """
        replaced = []
        rdt = self.config.transport in ("gloo", "nccl")
        for w, h in enumerate(self.workers):
            if rdt:
                ray.kill(h, no_restart=True)
                state = "dead"
            else:
                state = _wait_alive(h, timeout_s)
            if state == "dead":
                self.workers[w] = spawn_worker(
                    pg=self.pg,
                    bundle=self.bundles[w],
                    config=self.config,
                    worker=w,
                    placement=self.expert_placement,
                    resources=self.resources,
                )
                replaced.append(f"worker {w}")
        frontend_state = "alive" if rdt else _wait_alive(self.frontend, timeout_s)
        if replaced or frontend_state == "dead":
            if frontend_state != "dead":
                ray.kill(self.frontend, no_restart=True)
            self._spawn_frontend()
            replaced.append("frontend")
        return replaced

    def _call(self, submit: Callable[[Any], Any]) -> Any:
        """``submit(frontend_actor)`` returns an object ref; its result, with actor loss turned into
        :class:`ExpertWorkerError` and the frontend's own exceptions re-raised as they are."""
        if self._suspect:
            self._suspect = False
            self.heal()
        try:
            return ray.get(submit(self.frontend))
        except RayActorError as e:
            self._suspect = True
            raise ExpertWorkerError(
                f"the frontend actor was lost ({type(e).__name__}): an expert worker died or a transfer to it failed, "
                "and over RDT Ray stops both ends of a failed transfer. It is replaced before the next request."
            ) from None
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, Exception):
                raise cause from None
            raise

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        outs = self._call(lambda fe: fe.generate.remote(prompts, params))
        if any(o.finish_reason == "error" for o in outs):
            self._suspect = True
        return outs

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self._call(lambda fe: fe.logits.remote(token_ids))

    def frontend_info(self) -> dict:
        return self._call(lambda fe: fe.info.remote())

    def expert_load(self) -> list[list[int]]:
        return self._call(lambda fe: fe.expert_load.remote())

    def _ask(self, method: str, timeout_s: float) -> list[tuple[Any, BaseException | None]]:
        """``method`` of every worker at once: (reply, None) or (None, the error; GetTimeoutError after
        ``timeout_s`` in all), in worker order."""
        refs = [getattr(w, method).remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[tuple[Any, BaseException | None]] = []
        for ref in refs:
            if ref not in ready:
                out.append((None, GetTimeoutError()))
                continue
            try:
                out.append((ray.get(ref), None))
            except Exception as e:
                out.append((None, e))
        return out

    def placement(self, timeout_s: float = 10.0) -> list[dict]:
        """Each worker's ``info()``; a worker that does not answer within ``timeout_s`` is
        ``{"worker": w, "experts": <its share>, "error": <why>}``."""
        return [
            reply
            if error is None
            else {"worker": w, "experts": self.expert_placement.experts_of(w), "error": type(error).__name__}
            for w, (reply, error) in enumerate(self._ask("info", timeout_s))
        ]

    def health(self, timeout_s: float = 3.0) -> dict:
        """:func:`health_report` of the workers, each asked for its status at once (``timeout_s`` in all)."""
        entries = [worker_health(w, reply, error) for w, (reply, error) in enumerate(self._ask("status", timeout_s))]
        return health_report(self.expert_placement, entries)

    def shutdown(self) -> None:
        if self.frontend is not None:  # tear the channel graph down while both ends are alive
            with contextlib.suppress(Exception):
                ray.get(self.frontend.close.remote(), timeout=10)
        for actor in [self.frontend, *self.workers]:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)
        if self.owns_ray:
            ray.shutdown()
