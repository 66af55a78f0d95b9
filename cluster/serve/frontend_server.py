"""The frontend as a Ray Serve deployment: it owns its expert workers and runs the continuous-batching engine.

Stream contract of :meth:`FrontendServer.generate` (what the ingress consumes): the first item is ``"accepted"``
or the :class:`~cluster.errors.MixserveError` that refused the request; then :class:`~cluster.engine.RequestOutput`
items until one is finished. A finished output with ``finish_reason == "error"`` carries its error
(``ExpertWorkerError`` when a worker failed, ``InternalError`` when the step failed otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from cluster.builder import build_frontend
from cluster.cluster import expert_client, health_report, launch_workers, worker_health
from cluster.config import ModelConfig
from cluster.engine import AsyncEngine, RequestOutput
from cluster.errors import InternalError, MixserveError
from cluster.placement import ExpertPlacement
from cluster.sampling import SamplingParams
from cluster.serve.args import AppArgs
from workers.expert_worker import use_assigned_cpus

log = logging.getLogger("mixserve")

ACCEPTED = "accepted"


class FrontendServer:
    """Deployment body. Starts W expert workers in a placement group, loads the non-expert weights, and serves
    ``generate`` as an async stream (see the module docstring)."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs(**args)
        use_assigned_cpus()  # torch threads = the replica's frontend_cpus
        config = self.args.cluster_config()
        self.pg = None
        self.workers: list = []
        self.placement: ExpertPlacement | None = None
        experts = None
        if config.expert_workers > 0:
            self.placement = placement = config.placement(ModelConfig.from_dir(config.model))
            group = launch_workers(
                config,
                placement=placement,
                frontend_bundle=False,
                # Named so operators (and tests) can find them: mixserve-expert-<replica>-<worker>.
                name_prefix=f"mixserve-expert-{uuid.uuid4().hex[:8]}-",
            )
            self.pg, self.workers = group.pg, group.handles
            experts = expert_client(
                config.model_copy(
                    update={"worker_timeout_s": min(config.worker_timeout_s, self.args.request_timeout_s)}
                ),
                placement,
                self.workers,
            )
        self.frontend = build_frontend(config, experts=experts, progress=True)
        self.engine = AsyncEngine(self.frontend.core)
        log.info(
            "mixserve frontend ready: %s, %d expert workers, %d copies of each expert",
            config.model,
            config.expert_workers,
            config.expert_replicas,
        )

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[str | MixserveError | RequestOutput]:
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
            yield ACCEPTED
            started = True
            async for out in stream:  # leaving this loop early aborts the request (AsyncEngine's stream)
                yield out
        finally:
            if not started:  # cancelled at acceptance: the engine's stream was never read
                self.engine.cancel(request_id)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def health(self, timeout_s: float = 3.0) -> dict:
        """:func:`~cluster.cluster.health_report`: every worker asked for its status at once, ``timeout_s`` each;
        ok while every expert has a copy on a worker that answered."""

        async def status(i: int, handle: Any) -> dict:
            try:
                return worker_health(i, await asyncio.wait_for(handle.status.remote(), timeout=timeout_s))
            except Exception as e:
                return worker_health(i, None, e)

        workers = list(await asyncio.gather(*(status(i, h) for i, h in enumerate(self.workers))))
        if self.placement is None:
            return {"ok": True, "workers": workers, "missing_experts": []}
        return health_report(self.placement, workers)

    async def stats(self) -> dict:
        core = self.frontend.core
        return {
            "engine": core.stats(),
            "expert_load": self.frontend.expert_load(),
            "workers": len(self.workers),
            "failovers": self.frontend.experts.failovers,
            "max_model_len": core.max_model_len,
        }

    def model_info(self) -> dict:
        return {
            "max_model_len": self.frontend.core.max_model_len,
            "vocab_size": self.frontend.model_config.vocab_size,
            "model_path": self.frontend.config.model,
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()
        with contextlib.suppress(Exception):
            self.frontend.experts.close()  # a compiled graph (channel transport) goes before its actors
        with contextlib.suppress(Exception):
            for h in self.workers:
                ray.kill(h, no_restart=True)
            if self.pg is not None:
                remove_placement_group(self.pg)
