"""Start the expert-sharded cluster on Ray: a placement group, W expert workers and (for the offline API) a
frontend actor.

Resources come only from Ray: each worker's bundle asks ``gpus_per_worker`` GPUs when the cluster has GPUs, and
each actor uses whatever GPU Ray assigned it (never a hard-coded device id).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.config import ModelConfig
from cluster.engine import EngineConfig
from cluster.placement import STRATEGIES, ExpertPlacement, PlacementError

FRONTEND_BUNDLE = 0


@dataclass(frozen=True)
class WorkerResources:
    gpus_per_worker: float
    frontend_gpus: float
    cpus_per_worker: float = 1.0


def resolve_resources(expert_workers: int, gpus_per_worker: float | None) -> WorkerResources:
    """GPUs per worker: as asked, or 1 when the cluster has a GPU for every worker, else 0 (CPU)."""
    import ray

    total = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if total >= expert_workers else 0.0
    if gpus_per_worker < 0:
        raise PlacementError("gpus_per_worker must be >= 0")
    if gpus_per_worker * expert_workers > total:
        raise PlacementError(
            f"{expert_workers} expert workers x {gpus_per_worker} GPUs need {gpus_per_worker * expert_workers:g} "
            f"GPUs; the Ray cluster has {total:g}"
        )
    frontend = 1.0 if gpus_per_worker > 0 and total >= gpus_per_worker * expert_workers + 1 else 0.0
    return WorkerResources(gpus_per_worker=gpus_per_worker, frontend_gpus=frontend)


def start_workers(
    *,
    model: str,
    config: ModelConfig,
    placement: ExpertPlacement,
    dtype: str,
    resources: WorkerResources,
    strategy: str = "PACK",
    frontend_bundle: bool = True,
    ready_timeout_s: float = 120.0,
    load_timeout_s: float = 1800.0,
    name_prefix: str | None = None,
) -> tuple[Any, list]:
    """Reserve a placement group and start one :class:`~workers.expert.ExpertWorker` per bundle.

    Bundle 0 is the frontend's when ``frontend_bundle``; the workers take the next W bundles. Workers restart
    forever (``max_restarts=-1``) and reload their experts; calls in flight when one dies fail (no retries).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if strategy not in STRATEGIES:
        raise PlacementError(f"placement strategy {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    bundles = []
    if frontend_bundle:
        fb = {"CPU": 1.0}
        if resources.frontend_gpus:
            fb["GPU"] = resources.frontend_gpus
        bundles.append(fb)
    for _ in range(placement.num_workers):
        b = {"CPU": resources.cpus_per_worker}
        if resources.gpus_per_worker:
            b["GPU"] = resources.gpus_per_worker
        bundles.append(b)
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
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except Exception as e:
        remove_placement_group(pg)
        free = ray.available_resources()
        raise PlacementError(
            f"could not reserve {len(bundles)} bundles {bundles} with strategy {strategy} within "
            f"{ready_timeout_s:.0f}s ({type(e).__name__}); free now: "
            f"{ {k: free.get(k, 0.0) for k in need} } - other actors hold the rest"
        ) from None
    offset = 1 if frontend_bundle else 0
    handles = [
        spawn_worker(
            pg=pg,
            bundle=offset + w,
            model=model,
            worker=w,
            placement=placement,
            dtype=dtype,
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
    return pg, handles


def spawn_worker(
    *,
    pg: Any,
    bundle: int,
    model: str,
    worker: int,
    placement: ExpertPlacement,
    dtype: str,
    resources: WorkerResources,
    name: str | None = None,
) -> Any:
    """One expert-worker actor in its placement-group bundle. It loads its own experts and restarts forever."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.expert import ExpertWorker

    return (
        ray.remote(enable_tensor_transport=True)(ExpertWorker)
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
        .remote(model=model, worker=worker, experts=placement.experts_of(worker), dtype=dtype)
    )


def launch_workers(
    *,
    model: str,
    expert_workers: int,
    dtype: str,
    gpus_per_worker: float | None,
    strategy: str,
    expert_placement: Sequence[Sequence[int]] | None = None,
    frontend_bundle: bool,
    name_prefix: str | None = None,
) -> tuple[ExpertPlacement, WorkerResources, Any, list]:
    """Plan the placement (contiguous unless a map is given), size the resources and start the workers."""
    config = ModelConfig.from_dir(model)
    if expert_placement is None:
        placement = ExpertPlacement.contiguous(
            num_layers=config.num_layers, num_experts=config.num_experts, num_workers=expert_workers
        )
    else:
        placement = ExpertPlacement.from_map(
            expert_placement,
            num_layers=config.num_layers,
            num_experts=config.num_experts,
            num_workers=expert_workers,
        )
    resources = resolve_resources(expert_workers, gpus_per_worker)
    pg, workers = start_workers(
        model=model,
        config=config,
        placement=placement,
        dtype=dtype,
        resources=resources,
        strategy=strategy,
        frontend_bundle=frontend_bundle,
        name_prefix=name_prefix,
    )
    return placement, resources, pg, workers


class FrontendActor:
    """Ray actor body for the offline API's frontend: builds the expert client over the worker handles."""

    def __init__(
        self,
        *,
        model: str,
        dtype: str,
        engine: EngineConfig,
        placement: ExpertPlacement,
        handles: list,
        transport: str,
        attention_backend: str,
        timeout_s: float,
    ) -> None:
        from router.transport import RayExperts
        from workers.frontend import Frontend

        if transport == "object_ref":
            experts: Any = RayExperts(handles, timeout_s=timeout_s)
        else:
            from router.rdt import RdtExperts

            experts = RdtExperts(handles, backend=transport, timeout_s=timeout_s)
        self.frontend = Frontend(
            model=model,
            dtype=dtype,
            engine=engine,
            placement=placement,
            experts=experts,
            attention_backend=attention_backend,
            progress=False,
        )
        self._lock = threading.Lock()

    def generate(self, prompts: list[list[int]], params: list) -> list:
        with self._lock:
            return self.frontend.generate(prompts, params)

    def logits(self, token_ids: list[int]):
        with self._lock:
            return self.frontend.logits(token_ids)

    def info(self) -> dict:
        import ray

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

    # Ray Direct Transport hooks: the frontend's own tasks that hand tensors to and from the collective group.
    def rdt_stage(self, key: int):
        return self.frontend.runner.experts.stage(key)

    def rdt_absorb(self, key: int, partial) -> bool:
        return self.frontend.runner.experts.absorb(key, partial)


def _wait_alive(actor: Any, timeout_s: float) -> str:
    """Return alive, dead (gone for good) or unknown (still restarting when the time ran out)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

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
        pg: Any,
        workers: list,
        placement: ExpertPlacement,
        resources: WorkerResources,
        owns_ray: bool,
        frontend_kwargs: dict,
    ) -> None:
        self.pg = pg
        self.workers = workers
        self.expert_placement = placement
        self.resources = resources
        self.owns_ray = owns_ray
        self.frontend_kwargs = frontend_kwargs
        self.frontend: Any = None
        self._suspect = False

    @classmethod
    def start(
        cls,
        *,
        model: str,
        expert_workers: int,
        dtype: str = "float32",
        engine: EngineConfig | None = None,
        attention_backend: str = "auto",
        address: str | None = None,
        gpus_per_worker: float | None = None,
        placement_strategy: str = "PACK",
        transport: str = "object_ref",
        expert_placement: Sequence[Sequence[int]] | None = None,
        timeout_s: float = 60.0,
        progress: bool = True,
    ) -> ExpertCluster:
        import ray

        from router.transport import TRANSPORTS

        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is unknown; use one of {', '.join(TRANSPORTS)}")
        owns_ray = False
        if not ray.is_initialized():
            # No address: a new local instance (not whatever `ray start` cluster happens to run here).
            ray.init(address=address or "local", log_to_driver=progress)
            owns_ray = address is None
        placement, resources, pg, workers = launch_workers(
            model=model,
            expert_workers=expert_workers,
            dtype=dtype,
            gpus_per_worker=gpus_per_worker,
            strategy=placement_strategy,
            expert_placement=expert_placement,
            frontend_bundle=True,
        )
        self = cls(
            pg=pg,
            workers=workers,
            placement=placement,
            resources=resources,
            owns_ray=owns_ray,
            frontend_kwargs={
                "model": model,
                "dtype": dtype,
                "engine": engine or EngineConfig(),
                "placement": placement,
                "transport": transport,
                "attention_backend": attention_backend,
                "timeout_s": timeout_s,
            },
        )
        try:
            self._spawn_frontend()
        except Exception:
            self.shutdown()
            raise
        return self

    def _spawn_frontend(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.frontend = (
            ray.remote(enable_tensor_transport=True)(FrontendActor)
            .options(
                num_cpus=1,
                num_gpus=self.resources.frontend_gpus,
                max_concurrency=8,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=FRONTEND_BUNDLE
                ),
            )
            .remote(handles=self.workers, **self.frontend_kwargs)
        )
        ray.get(self.frontend.ping.remote())

    def heal(self, timeout_s: float = 30.0) -> list[str]:
        """Replace actors that are gone for good and wait for restarting ones; returns what was replaced.

        Over RDT, Ray stops both ends of a failed transfer and survivors of the broken collective group cannot
        join a new one reliably, so every worker and the frontend are replaced (fresh processes, fresh group).
        """
        import ray

        replaced = []
        kw = self.frontend_kwargs
        rdt = kw["transport"] != "object_ref"
        for w, h in enumerate(self.workers):
            if rdt:
                ray.kill(h, no_restart=True)
                state = "dead"
            else:
                state = _wait_alive(h, timeout_s)
            if state == "dead":
                self.workers[w] = spawn_worker(
                    pg=self.pg,
                    bundle=1 + w,
                    model=kw["model"],
                    worker=w,
                    placement=self.expert_placement,
                    dtype=kw["dtype"],
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

    def call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from cluster.errors import ExpertWorkerError

        if self._suspect:
            self._suspect = False
            self.heal()
        try:
            result = ray.get(getattr(self.frontend, method).remote(*args))
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
        if method == "generate" and any(o.finish_reason == "error" for o in result):
            self._suspect = True
        return result

    def placement(self) -> list[dict]:
        import ray

        return ray.get([w.info.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in [self.frontend, *self.workers]:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)
        if self.owns_ray:
            ray.shutdown()
