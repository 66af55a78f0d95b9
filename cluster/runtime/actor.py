"""The offline API's frontend as a Ray actor: a :class:`~cluster.runtime.runtime.FrontendRuntime` (its expert pool,
client and frontend) in its own process, called from the driver (``cluster.runtime.offline``). The actor class is
built with the transport's host hooks when the registry row names any (``cluster.runtime.transports.host_class``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import ray
import torch

from cluster.config.cluster import ClusterConfig
from cluster.engine.request import Params, RequestOutput
from cluster.runtime.runtime import FrontendRuntime
from workers.expert_worker import use_assigned_cpus


class FrontendActor:
    """Ray actor body: generate / logits one call at a time (the engine batches the prompts of a call); health,
    placement and info answer meanwhile (a threaded actor)."""

    def __init__(self) -> None:
        use_assigned_cpus()
        self._lock = threading.Lock()
        self._runtime: FrontendRuntime | None = None
        self._finished: list[tuple[int, int, int]] = []  # the running generate's finished requests (progress)

    def start(
        self, config: ClusterConfig, name_prefix: str | None = None, pool_owner: Any = None, name: str = "frontend"
    ) -> bool:
        """Start the pool (or attach, as ``name``, to the one ``pool_owner`` owns) and build the frontend (a method,
        not the constructor, so that a failure reaches the driver as the exception it is)."""
        with self._lock:
            self._runtime = FrontendRuntime(
                config, name_prefix=name_prefix, pool_owner=pool_owner, frontend=name, progress=False
            )
        return True

    @property
    def runtime(self) -> FrontendRuntime:
        assert self._runtime is not None, "start() first"
        return self._runtime

    def generate(self, prompts: list[list[int]], params: list[Params], track: bool = False) -> list[RequestOutput]:
        """``track``: record (request, prompt tokens, output tokens) as requests finish, for :meth:`progress`."""
        with self._lock:
            finished: list[tuple[int, int, int]] = []
            self._finished = finished
            done = (lambda i, o: finished.append((i, len(o.prompt_token_ids), len(o.token_ids)))) if track else None
            return self.runtime.frontend.core.generate(prompts, params, done)

    def progress(self, since: int) -> list[tuple[int, int, int]]:
        """The running (or last) generate's finished requests from the ``since``-th on (answers meanwhile)."""
        return self._finished[since:]

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        with self._lock:
            return self.runtime.frontend.core.logits(token_ids)

    def apply(self, fn: Callable[[FrontendRuntime], Any]) -> Any:
        """``fn(runtime)`` in this process, between calls (``LLM.apply_model``, the benchmarks)."""
        with self._lock:
            return fn(self.runtime)

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            **self.runtime.frontend.info(),
            "pid": os.getpid(),
            "actor_name": ctx.get_actor_name(),
            "node_id": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
        }

    def expert_load(self) -> list[list[int]]:
        return self.runtime.frontend.expert_load()

    def health(self, timeout_s: float) -> dict:
        return self.runtime.health(timeout_s)

    def placement(self, timeout_s: float) -> list[dict]:
        return self.runtime.placement(timeout_s)

    def heal(self, timeout_s: float) -> list[str]:
        with self._lock:
            return self.runtime.heal(timeout_s)

    def expert_transport(self) -> Any:
        return self.runtime.expert_transport()

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        """Release the transport, then the workers and their placement group."""
        if self._runtime is not None:
            self._runtime.close()
