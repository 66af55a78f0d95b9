"""GET /health: 200 only when the frontend and every expert worker answer."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.serve.protocol import HealthResponse, WorkerHealth


async def check_health(frontend: Any) -> tuple[int, HealthResponse]:
    """(HTTP status, body): 503 "unavailable" when the frontend does not answer, 503 "degraded" when a worker
    does not."""
    try:
        h = await asyncio.wait_for(frontend.health.remote(), timeout=10)
    except Exception as e:
        return 503, HealthResponse(status="unavailable", error=type(e).__name__)
    workers = [WorkerHealth.model_validate(w) for w in h["workers"]]
    if not h["ok"]:
        return 503, HealthResponse(status="degraded", workers=workers)
    return 200, HealthResponse(status="ok", workers=workers)
