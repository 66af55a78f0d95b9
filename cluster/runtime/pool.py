"""An expert pool on Ray: W expert-worker actors in one placement group, each holding its share of every layer's
experts (``router.placement.ExpertPlacement``), with their health and the replacement of workers gone for good:
started and owned by this process (:class:`ExpertPool`), or owned elsewhere and attached to (:class:`AttachedPool`,
see ``cluster.runtime.pool_owner``).

Resources come only from Ray: each worker's bundle asks ``gpus_per_worker`` GPUs when the cluster has GPUs, and
each actor uses whatever GPU Ray assigned it (never a hard-coded device id). A worker restarts by itself when its
process dies (``max_restarts=-1``: Ray restarts it in its bundle and it reloads exactly its experts); calls in
flight when it dies fail (no retries), so the frontend fails over or fails those requests at once.

The process that launches a pool owns it: the workers and the placement group go when that process does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config.cluster import ClusterConfig
from cluster.config.transports import spec_of
from cluster.errors import PlacementError
from cluster.runtime.resources import WorkerResources, resolve_resources
from router.placement import ExpertPlacement, interleave_nodes
from workers.expert_worker import ExpertWorker

# Calls a worker takes at once over a transport that shares a pool (its registry row's shared_pool): the layer
# messages of every frontend attached to it (two micro-batches each), besides health and status calls; the messages
# themselves run one merged batch at a time (workers.merge). Other transports serve one frontend: their workers
# stay single-threaded and compute in the call, unmerged (with the merger's thread, channel layers did not answer
# now and then on the 2-core box).
MAX_CONCURRENT_CALLS = 32
DETACH_TIMEOUT_S = 2.0  # the longest a frontend waits, shutting down, for its pool owner to take its detach


def cluster_resources(config: ClusterConfig) -> WorkerResources:
    """GPUs and CPUs per worker and for the frontend, given the GPUs this Ray cluster has."""
    parallel = config.parallel
    gpus = resolve_resources(
        expert_workers=parallel.expert_workers,
        gpus_per_worker=parallel.gpus_per_worker,
        total_gpus=float(ray.cluster_resources().get("GPU", 0)),
    )
    return dataclasses.replace(gpus, cpus_per_worker=parallel.cpus_per_worker, frontend_cpus=parallel.frontend_cpus)


def reserve(
    bundles: list[dict[str, float]], *, strategy: str, name: str | None = None, timeout_s: float = 120.0
) -> PlacementGroup:
    """A ready placement group (named ``name``, else ``mixserve-<time>``); fails at once when the cluster can never
    hold the bundles, after ``timeout_s`` (saying what is free) when it is busy."""
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
    pg = placement_group(bundles, strategy=strategy, name=name or f"mixserve-{time.time_ns()}")
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


def worker_bundles(pg: PlacementGroup, *, count: int, replicas: int) -> list[int]:
    """The bundle of each worker: in order, or (copies of experts) ordered so that neighbouring workers, which
    hold an expert's copies, sit on different nodes when the group spans several."""
    bundles = list(range(count))
    if replicas == 1:
        return bundles
    nodes = placement_group_table(pg)["bundles_to_node_id"]
    return [bundles[i] for i in interleave_nodes([str(nodes[b]) for b in bundles])]


def worker_health(worker: int, status: dict | None, error: BaseException | None = None) -> dict:
    """One worker's entry of a health report from its ``status()`` reply, or from the error instead (``dead``:
    Ray will not restart it)."""
    if error is not None or status is None:
        entry = {"worker": worker, "ok": False, "error": type(error).__name__ if error else "no reply"}
        if isinstance(error, ActorDiedError):
            entry["dead"] = True
        return entry
    return {
        "worker": worker,
        "ok": True,
        "load_seconds": status["load_seconds"],
        "pid": status["pid"],
        "expert_bytes": status["loaded_bytes"],  # as held: quantized experts in their stored form
        "merge": status.get("merge"),  # what its merger ran: rows per run, expert matmuls (workers.merge)
    }


def health_report(placement: ExpertPlacement, workers: list[dict]) -> dict:
    """``workers`` holds one ``{"worker": w, "ok": bool, ...}`` per worker. ``ok`` when every expert has a copy on a
    worker that answered; ``missing_experts`` lists the [layer, expert] pairs that have none (with one copy per
    expert: every expert of every worker that did not answer)."""
    missing = placement.missing({w["worker"] for w in workers if w["ok"]})
    return {"ok": not missing, "workers": workers, "missing_experts": [list(p) for p in missing]}


class WorkerSet:
    """The expert workers a frontend calls (``handles[w]`` is worker w) and the placement plan they follow; asked
    for their health and info directly, all at once."""

    placement: ExpertPlacement
    handles: list[Any]

    def ask(self, method: str, timeout_s: float) -> list[tuple[Any, BaseException | None]]:
        """``method`` of every worker at once: (reply, None) or (None, the error; GetTimeoutError after
        ``timeout_s`` in all), in worker order."""
        refs = [getattr(w, method).remote() for w in self.handles]
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

    def health(self, timeout_s: float = 3.0) -> dict:
        """:func:`health_report` of the workers, each asked for its status at once (``timeout_s`` in all)."""
        entries = [worker_health(w, reply, error) for w, (reply, error) in enumerate(self.ask("status", timeout_s))]
        return health_report(self.placement, entries)

    def info(self, timeout_s: float = 10.0) -> list[dict]:
        """Each worker's ``info()``; a worker that does not answer within ``timeout_s`` is
        ``{"worker": w, "experts": <its share>, "error": <why>}``."""
        return [
            reply
            if error is None
            else {"worker": w, "experts": self.placement.experts_of(w), "error": type(error).__name__}
            for w, (reply, error) in enumerate(self.ask("info", timeout_s))
        ]


@dataclasses.dataclass
class ExpertPool(WorkerSet):
    """Expert workers this process started and owns: ``handles[w]`` runs in bundle ``bundles[w]`` of ``pg``."""

    config: ClusterConfig
    placement: ExpertPlacement
    resources: WorkerResources
    pg: PlacementGroup
    handles: list[Any]
    bundles: list[int]
    name_prefix: str | None = None

    @classmethod
    def launch(
        cls,
        config: ClusterConfig,
        placement: ExpertPlacement,
        *,
        name_prefix: str | None = None,
        load_timeout_s: float = 1800.0,
    ) -> ExpertPool:
        """Reserve the placement group and start one worker per bundle; returns once every worker has its experts.
        ``name_prefix``: worker w is the named actor ``<prefix><w>`` (operators and tests find them so)."""
        resources = cluster_resources(config)
        gpu = {"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}
        bundles = [{"CPU": resources.cpus_per_worker, **gpu} for _ in range(placement.num_workers)]
        pg = reserve(
            bundles, strategy=config.parallel.placement_strategy, name=f"{name_prefix}pg" if name_prefix else None
        )
        order = worker_bundles(pg, count=placement.num_workers, replicas=placement.replicas)
        pool = cls(config, placement, resources, pg, [], order, name_prefix)
        pool.handles = [pool._spawn(w) for w in range(placement.num_workers)]
        try:
            ray.get([h.ping.remote() for h in pool.handles], timeout=load_timeout_s)  # workers load their experts
        except Exception:
            pool.shutdown()
            raise
        return pool

    def _spawn(self, worker: int) -> Any:
        """Worker ``worker`` in its bundle: it loads its own experts and restarts forever; calls in flight when it
        dies fail (no retries)."""
        load = self.config.load
        shared = spec_of(self.config.parallel.transport).shared_pool
        return (
            # ray.remote's typed overloads predate enable_tensor_transport (RDT); the call is what Ray documents.
            ray.remote(enable_tensor_transport=True)(ExpertWorker)  # pyright: ignore[reportCallIssue]
            .options(
                num_cpus=self.resources.cpus_per_worker,
                num_gpus=self.resources.gpus_per_worker,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=MAX_CONCURRENT_CALLS if shared else 1,
                name=f"{self.name_prefix}{worker}" if self.name_prefix else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=self.bundles[worker]
                ),
            )
            .remote(
                model=load.model,
                worker=worker,
                experts=self.placement.experts_of(worker),
                dtype=load.dtype,
                quantization=load.quantization,
                merge=shared,
            )
        )

    def replace_dead(self, timeout_s: float = 30.0) -> list[int]:
        """Start a new worker, in the same bundle, for each one Ray will not restart (gone for good); wait for
        restarting ones up to ``timeout_s``. Returns the workers replaced."""
        replaced = []
        for w, h in enumerate(self.handles):
            if wait_alive(h, timeout_s) == "dead":
                self.handles[w] = self._spawn(w)
                replaced.append(w)
        return replaced

    def shutdown(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):
                ray.kill(h, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)


def remove_pool(name_prefix: str, workers: int) -> None:
    """Kill the named workers ``<prefix><w>`` and remove the placement group ``<prefix>pg`` of a pool whose owner
    is gone, if they are still there."""
    for w in range(workers):
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(f"{name_prefix}{w}"), no_restart=True)
    with contextlib.suppress(Exception):
        remove_placement_group(ray.util.get_placement_group(f"{name_prefix}pg"))


def wait_alive(actor: Any, timeout_s: float) -> str:
    """alive, dead (gone for good) or unknown (still restarting when the time ran out)."""
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


class AttachedPool(WorkerSet):
    """A pool owned by a :class:`~cluster.runtime.pool_owner.PoolOwner` (a Serve deployment handle or a Ray actor
    handle), attached to as ``frontend`` with the pool options ``options`` (checked by the owner): this process calls
    its workers but never starts or kills them."""

    def __init__(self, owner: Any, frontend: str, options: dict[str, Any]) -> None:
        self.owner, self.frontend, self.options = owner, frontend, options
        self._attach()

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """The owner's ``method``, waited for (an actor call, or a Serve deployment call: waited for on a thread
        of its own, since a Serve replica's constructor runs on the replica's event loop, where Serve forbids it),
        up to ``timeout_s`` (None: as long as it takes; a Serve call that runs out of time is cancelled)."""
        response = getattr(self.owner, method).remote(*args)
        if not hasattr(response, "result"):
            return ray.get(response, timeout=timeout_s)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mixserve-pool-call") as wait:
            try:
                return wait.submit(response.result, timeout_s=timeout_s).result()
            except TimeoutError:
                response.cancel()
                raise

    def _attach(self) -> None:
        view = self._call("attach", self.frontend, self.options)
        self.handles, self.placement, self.name = view["handles"], view["placement"], view["pool"]

    def replace_dead(self, timeout_s: float = 30.0) -> list[int]:
        """Ask the owner to replace the workers Ray will not restart and take the handles it has now; returns the
        workers whose handle changed (a restarted owner brings all new ones)."""
        before = list(self.handles)
        self._call("replace_dead", timeout_s)
        self._attach()
        return [w for w, (a, b) in enumerate(zip(before, self.handles, strict=True)) if a != b]

    def shutdown(self) -> None:
        """Detach (the workers stay up for the other frontends), waiting at most ``DETACH_TIMEOUT_S``: an owner that
        is itself shutting down (an application being deleted, its pool deployment gone first) never answers, and a
        wait without end held this frontend's replica until Serve's grace period (20 s) ran out and killed it
        (deleting an application with one expert worker took 21 s, now 5)."""
        with contextlib.suppress(Exception):
            self._call("detach", self.frontend, timeout_s=DETACH_TIMEOUT_S)
