"""The offline API's sharded cluster, seen from the driver: one frontend actor (``cluster.runtime.actor``) hosting
a frontend runtime and its expert pool, on a Ray this process joins or starts (:class:`RemoteFrontend`).

With ``expert_pool=<name>`` the frontend actor attaches to the shared pool of that name (a
:class:`~cluster.runtime.pool_owner.PoolOwner` actor in Ray namespace :data:`POOL_NAMESPACE`), started here, and
owned by this LLM, when none runs: a second ``LLM`` (this process or another driver of the same Ray) then shares its
workers. The pool stops when the last of them shuts down (or when the driver that started it exits). Ray restarts a
dead worker by itself (it reloads its experts). When the transport cannot keep the frontend
running through a worker's death (its registry row's ``keeps_frontend``: RDT, where Ray stops both ends of a failed
transfer), or the frontend actor itself is gone, :meth:`RemoteFrontend.heal` replaces the frontend actor (which
starts a fresh pool) before the next call; otherwise it asks the runtime to replace workers gone for good.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from cluster.config.cluster import ClusterConfig
from cluster.config.transports import spec_of
from cluster.engine.request import Params, RequestOutput
from cluster.errors import ExpertWorkerError
from cluster.runtime.actor import FrontendActor
from cluster.runtime.pool import cluster_resources, remove_pool, wait_alive
from cluster.runtime.pool_owner import PoolOwner, pool_options
from cluster.runtime.ray_start import start_local_ray
from cluster.runtime.transports import host_class

POOL_NAMESPACE = "mixserve"  # shared pools' owners are named actors here, found from any driver
# Owners of released pools that still have frontends attached, by name: Ray stops a (non-detached) actor once the
# handle that created it is gone, so this process keeps it until the last LLM attached leaves.
_RELEASED: dict[str, Any] = {}


class RemoteFrontend:
    """The frontend actor of an offline ``LLM(expert_workers=W)``; every call goes through :meth:`_call`."""

    def __init__(self, config: ClusterConfig, *, owns_ray: bool) -> None:
        self.config = config
        self.owns_ray = owns_ray
        self.name = self.name_prefix = ""  # named actors (and group): operators and tests find them
        self.actor: Any = None
        self.pool_owner: Any = None  # the shared pool's owner actor (expert_pool), None: the actor's own pool
        self.owns_pool = False  # whether this LLM started that pool (and stops it on shutdown)
        self._suspect = False

    def _find_pool(self) -> None:
        """The owner of the shared pool ``expert_pool``; started when none of that name runs."""
        name = self.config.parallel.expert_pool
        if name is None:
            return
        try:
            self.pool_owner = ray.get_actor(name, namespace=POOL_NAMESPACE)
            return
        except ValueError:
            pass
        owner = ray.remote(PoolOwner).options(
            name=name, namespace=POOL_NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=8, max_restarts=0
        )
        self.pool_owner = owner.remote(pool_options(self.config), name=name)
        self.owns_pool = True
        ray.get(self.pool_owner.ping.remote())  # its workers loaded (a failure is raised here, as it is)

    @classmethod
    def start(cls, config: ClusterConfig, *, address: str | None = None, progress: bool = True) -> RemoteFrontend:
        """Join ``address``, or use the Ray this process already started, or start a new local one (owned, sized
        for the frontend and its workers)."""
        owns_ray = False
        if not ray.is_initialized():
            if address is None:
                start_local_ray(config.parallel, extra_cpus=1, log_to_driver=progress)
                owns_ray = True
            else:
                ray.init(address=address, log_to_driver=progress)
        self = cls(config, owns_ray=owns_ray)
        try:
            self._find_pool()
            self._spawn()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _spawn(self) -> None:
        """A new frontend actor (named afresh: its predecessor's names may not be released yet) and its pool."""
        tag = uuid.uuid4().hex[:8]
        self.name, self.name_prefix = f"mixserve-frontend-{tag}", f"mixserve-expert-{tag}-"
        resources = cluster_resources(self.config)
        actor_class = host_class(FrontendActor, self.config.parallel.transport)
        self.actor = (
            ray.remote(enable_tensor_transport=True)(actor_class)  # pyright: ignore[reportCallIssue]
            .options(
                num_cpus=resources.frontend_cpus,
                num_gpus=resources.frontend_gpus,
                max_concurrency=8,
                max_restarts=0,
                max_task_retries=0,
                name=self.name,
            )
            .remote()
        )
        self._call(lambda fe: fe.start.remote(self.config, self.name_prefix, self.pool_owner, self.name))

    def heal(self, timeout_s: float = 30.0) -> list[str]:
        """Make the next call work: replace the frontend actor (and so its pool) when it is gone or the transport
        cannot keep it through a worker's death; else replace workers gone for good. Returns what was replaced."""
        if spec_of(self.config.parallel.transport).keeps_frontend and wait_alive(self.actor, timeout_s) == "alive":
            return ray.get(self.actor.heal.remote(timeout_s))
        self._stop_actor()
        self._spawn()
        return ["frontend and its expert workers"]

    def _call(self, submit: Callable[[Any], Any]) -> Any:
        """``submit(actor)`` returns an object ref; its result, with the actor's loss turned into
        :class:`ExpertWorkerError` and the frontend's own exceptions re-raised as they are."""
        if self._suspect:
            self._suspect = False
            self.heal()
        try:
            return ray.get(submit(self.actor))
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

    def generate(
        self,
        prompts: list[list[int]],
        params: list[Params],
        progress: Callable[[int, int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """``progress(i, prompt tokens, output tokens)`` as engine request i finishes (polled from the actor)."""
        if self._suspect:
            self._suspect = False
            self.heal()
        ref = self.actor.generate.remote(prompts, params, progress is not None)
        if progress is not None:
            self._follow(ref, progress)
        outs = self._call(lambda fe: ref)
        if any(o.finish_reason == "error" for o in outs):
            self._suspect = True
        return outs

    def _follow(self, ref: Any, progress: Callable[[int, int, int], None], interval_s: float = 0.5) -> None:
        """Report the actor's finished requests until ``ref`` is ready (a lost actor ends this; the caller's
        ``_call`` reports it)."""
        seen = 0
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=interval_s)
                for record in ray.get(self.actor.progress.remote(seen)):
                    progress(*record)
                    seen += 1
                if ready:
                    return
        except (RayActorError, RayTaskError):
            return

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self._call(lambda fe: fe.logits.remote(token_ids))

    def apply(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(runtime)`` inside the frontend actor, between calls; its result."""
        return self._call(lambda fe: fe.apply.remote(fn))

    def info(self) -> dict:
        return self._call(lambda fe: fe.info.remote())

    def expert_load(self) -> list[list[int]]:
        return self._call(lambda fe: fe.expert_load.remote())

    def health(self, timeout_s: float = 3.0) -> dict:
        return self._call(lambda fe: fe.health.remote(timeout_s))

    def placement(self, timeout_s: float = 10.0) -> list[dict]:
        return self._call(lambda fe: fe.placement.remote(timeout_s))

    def _stop_actor(self) -> None:
        """Close the actor's transport and pool (a channel graph goes while both ends live), then kill it. When the
        actor is already gone, its workers and placement group are removed here (Ray removes what a dead actor
        owned, but not at once)."""
        if self.actor is None:
            return
        closed = False
        with contextlib.suppress(Exception):
            closed = ray.get(self.actor.close.remote(), timeout=30) is None
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        self.actor = None
        if not closed and self.pool_owner is None:
            remove_pool(self.name_prefix, self.config.parallel.expert_workers)

    def shutdown(self) -> None:
        self._stop_actor()  # its frontend detaches from a shared pool
        if self.pool_owner is not None:
            # the pool goes with the last LLM to leave: the one that started it, or the last attached after it
            call = self.pool_owner.release if self.owns_pool else self.pool_owner.finished
            done = False
            with contextlib.suppress(Exception):
                done = bool(ray.get(call.remote(), timeout=30))
            name = self.config.parallel.expert_pool
            if done:
                with contextlib.suppress(Exception):
                    ray.kill(self.pool_owner, no_restart=True)
                _RELEASED.pop(name or "", None)
            elif self.owns_pool and name is not None:
                _RELEASED[name] = self.pool_owner
        self.pool_owner = None
        if self.owns_ray:
            ray.shutdown()
