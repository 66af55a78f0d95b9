"""The frontend as a Ray Serve deployment: a :class:`~cluster.runtime.runtime.FrontendRuntime` (its expert pool,
client and frontend, as the offline API's frontend actor holds one) with the continuous-batching engine running
in a background thread.

Stream contract of :meth:`FrontendServer.generate` (what the ingress consumes): the first item is
:class:`~cluster.serve.stream_items.Accepted` (naming this replica) or the :class:`~cluster.errors.MixserveError` that
refused the request; then :class:`~cluster.engine.RequestOutput`
items until one is finished. A finished output with ``finish_reason == "error"`` carries its error
(``ExpertWorkerError`` when a worker failed, ``InternalError`` when the step failed otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cluster.config.serving import AppArgs
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.request import Params, RequestOutput
from cluster.errors import InternalError, MixserveError, SetupError
from cluster.runtime.pool_owner import POOL_DEPLOYMENT
from cluster.runtime.runtime import FrontendRuntime
from cluster.serve.stream_items import Accepted
from workers.expert_worker import use_assigned_cpus

log = logging.getLogger("mixserve")


def _replica_name() -> str:
    """This Serve replica's id (``<app>#<deployment>#<id>``), or a random name outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # not in a replica (a test building the class directly)
        return f"frontend-{uuid.uuid4().hex[:8]}"


def _pool_handle(app: str, timeout_s: float = 300.0) -> Any:
    """The ``ExpertPool`` deployment of Serve application ``app``, waited for while that application is not there yet
    (``serve deploy`` of a config deploys its applications at once; the pool's may register after this one's)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return serve.get_deployment_handle(POOL_DEPLOYMENT, app_name=app)
        except KeyError:
            if time.monotonic() > deadline:
                raise SetupError(f"expert_pool: no Serve application {app!r} with an {POOL_DEPLOYMENT} deployment "
                                 f"appeared within {timeout_s:.0f}s") from None  # fmt: skip
            log.info("waiting for the expert pool application %r", app)
            time.sleep(1.0)


class FrontendServer:
    """Deployment body: builds the runtime (the non-expert weights; attached to the expert pool: ``pool``, the
    application's own ``ExpertPool`` deployment, or the one of the Serve application ``expert_pool`` names) and
    serves ``generate`` as an async stream (see the module docstring). ``name``: this replica's name, as the pool and
    the metrics know it."""

    def __init__(self, args: dict[str, Any], pool: Any = None) -> None:
        self.args = AppArgs.from_options(args)
        use_assigned_cpus()  # torch threads = the replica's frontend_cpus
        config = self.args.cluster_config()
        # a layer never waits longer for a worker than the request itself may take
        timeout = min(config.parallel.worker_timeout_s, self.args.serving.request_timeout_s)
        config = config.with_options(worker_timeout_s=timeout)
        self.name = _replica_name()
        if pool is None and config.parallel.expert_pool is not None:  # a pool application of its own
            pool = _pool_handle(config.parallel.expert_pool)
        self.runtime = FrontendRuntime(
            config, pool_owner=pool, frontend=self.name, name_prefix=f"mixserve-expert-{uuid.uuid4().hex[:8]}-"
        )
        self.frontend = self.runtime.frontend
        self.engine = AsyncEngine(self.frontend.core)
        self._healing: threading.Thread | None = None
        parallel = config.parallel
        log.info(
            "mixserve frontend ready: %s, %d expert workers over %s, %d copies of each expert",
            config.load.model,
            parallel.expert_workers,
            parallel.transport,
            parallel.expert_replicas,
        )

    async def generate(
        self, prompt_token_ids: list[int], params: Params, request_id: str
    ) -> AsyncIterator[Accepted | MixserveError | RequestOutput]:
        try:
            stream = await self.engine.generate(prompt_token_ids, params, request_id)
        except MixserveError as e:
            yield e
            return
        except Exception:
            log.exception("request %s could not be queued", request_id)
            yield InternalError(
                f"internal error queueing request {request_id}; see the server log", request_id=request_id
            )
            return
        started = False
        try:
            yield Accepted(self.name)
            started = True
            async for out in stream:  # leaving this loop early aborts the request (AsyncEngine's stream)
                yield out
        finally:
            if not started:  # cancelled at acceptance: the engine's stream was never read
                self.engine.cancel(request_id)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def health(self, timeout_s: float = 3.0) -> dict:
        """The runtime's health report (every worker asked at once, ``timeout_s`` in all; ok while every expert has
        a copy on a worker that answered). A worker Ray will not restart is replaced in the background."""
        report = await asyncio.to_thread(self.runtime.health, timeout_s)
        report["frontend"] = self.name
        if any(w.get("dead") for w in report["workers"]) and not (self._healing and self._healing.is_alive()):
            self._healing = threading.Thread(target=self._heal, name="mixserve-heal", daemon=True)
            self._healing.start()
        return report

    def _heal(self) -> None:
        try:
            self.runtime.heal()
        except Exception:
            log.exception("replacing expert workers failed; the next health check tries again")

    def record_routing_stats(self) -> dict[str, Any]:
        """What the request router (``cluster.serve.routing``) reads every second: sequences this replica can start
        now without queueing them."""
        core = self.frontend.core
        free = self.args.engine.max_num_seqs - core.num_running - core.num_waiting
        return {"free_seqs": max(0, free), "running": core.num_running, "waiting": core.num_waiting}

    async def stats(self) -> dict:
        core = self.frontend.core
        return {
            "engine": core.stats(),
            "expert_load": self.frontend.expert_load(),
            "workers": self.runtime.workers,
            "failovers": self.frontend.experts.failovers,
            "hedges": self.frontend.experts.hedges,  # layers sent to other copies because a worker was late
            "max_model_len": core.max_model_len,
            "pid": os.getpid(),
            "frontend": self.name,
        }

    def model_info(self) -> dict:
        """What the ingress checks requests against: the context and vocabulary, the hidden size (embeddings'
        ``dimensions``) and the head: ``num_labels`` (0: a causal LM), the label names and whether it generates."""
        mc = self.frontend.model_config
        return {
            "max_model_len": self.frontend.core.max_model_len,
            "vocab_size": mc.vocab_size,
            "model_path": self.frontend.config.load.model,
            "hidden_size": mc.hidden_size,
            "num_labels": mc.num_labels,
            "id2label": list(mc.id2label),
            "can_generate": mc.can_generate,
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()
        with contextlib.suppress(Exception):
            self.runtime.close()  # the transport (a compiled graph) goes before its actors
