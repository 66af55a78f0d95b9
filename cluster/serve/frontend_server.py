"""The frontend as a Ray Serve deployment: it owns its expert workers and runs the continuous-batching engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cluster.engine import AsyncEngine, EngineConfig
from cluster.errors import MixserveError
from cluster.sampling import SamplingParams
from cluster.serve.args import AppArgs

log = logging.getLogger("mixserve")


def error_item(e: BaseException) -> dict:
    """What travels back over the handle instead of an exception: type, message, status, gRPC code, param."""
    if isinstance(e, MixserveError):
        return {
            "error": {
                "type": type(e).__name__,
                "message": str(e),
                "http_status": e.http_status,
                "grpc_code": e.grpc_code,
                "param": getattr(e, "param", None),
            }
        }
    return {
        "error": {
            "type": type(e).__name__,
            "message": f"internal error: {type(e).__name__}",
            "http_status": 500,
            "grpc_code": "INTERNAL",
            "param": None,
        }
    }


class FrontendServer:
    """Deployment body. Starts W expert workers in a placement group, loads the non-expert weights, and serves
    ``generate`` as an async stream (first item ``{"accepted": True}`` or ``{"error": ...}``, then outputs)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from workers.frontend import Frontend

        a = AppArgs(**args)
        self.args = a
        model = a.resolved_model()
        self.pg = None
        self.workers: list = []
        experts = None
        placement = None
        if a.expert_workers > 0:
            from cluster.cluster import launch_workers
            from router.transport import RayExperts

            placement, _, self.pg, self.workers = launch_workers(
                model=model,
                expert_workers=a.expert_workers,
                dtype=a.dtype,
                gpus_per_worker=a.gpus_per_worker,
                strategy=a.placement_strategy,
                frontend_bundle=False,
                # Named so operators (and tests) can find them: mixserve-expert-<replica>-<worker>.
                name_prefix=f"mixserve-expert-{uuid.uuid4().hex[:8]}-",
            )
            experts = RayExperts(self.workers, timeout_s=min(60.0, a.request_timeout_s))
        self.frontend = Frontend(
            model=model,
            dtype=a.dtype,
            engine=EngineConfig(
                max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens,
                max_queued_requests=a.max_queued_requests,
                max_model_len=a.max_model_len,
            ),
            placement=placement,
            experts=experts,
            attention_backend=a.attention_backend,
            progress=True,
        )
        self.engine = AsyncEngine(self.frontend.core)
        log.info("mixserve frontend ready: %s, %d expert workers", model, a.expert_workers)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator:
        try:
            stream = await self.engine.generate(prompt_token_ids, params, request_id)
        except Exception as e:
            yield error_item(e)
            return
        yield {"accepted": True}
        async for out in stream:
            yield out

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def health(self, timeout_s: float = 3.0) -> dict:
        """Every expert worker must answer a ping within ``timeout_s``."""
        workers = []
        for i, h in enumerate(self.workers):
            try:
                await asyncio.wait_for(h.ping.remote(), timeout=timeout_s)
                workers.append({"worker": i, "ok": True})
            except Exception as e:
                workers.append({"worker": i, "ok": False, "error": type(e).__name__})
        return {"ok": all(w["ok"] for w in workers), "workers": workers}

    async def stats(self) -> dict:
        core = self.frontend.core
        return {
            "engine": core.stats(),
            "expert_load": self.frontend.expert_load(),
            "workers": len(self.workers),
            "max_model_len": core.max_model_len,
        }

    def model_info(self) -> dict:
        return {
            "max_model_len": self.frontend.core.max_model_len,
            "vocab_size": self.frontend.config.vocab_size,
            "model_path": self.frontend.model,
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()
        with contextlib.suppress(Exception):
            import ray
            from ray.util.placement_group import remove_placement_group

            for h in self.workers:
                ray.kill(h, no_restart=True)
            if self.pg is not None:
                remove_placement_group(self.pg)
