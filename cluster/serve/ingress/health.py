"""GET /health: 200 only when the frontend and every expert worker answer, and always within a second.

A background task of the ingress replica asks the frontend every :data:`REFRESH_S` seconds (the frontend pings
each worker); ``/health`` answers from the latest result, so a slow frontend, a hung worker or a large request
being tokenized never makes the probe itself slow (a Kubernetes probe that times out restarts the pod). A result
older than :data:`STALE_S` means the frontend stopped answering: 503.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

REFRESH_S = 1.0
STALE_S = 3.0
FIRST_ANSWER_WAIT_S = 0.8  # the first /health of a replica waits this long for the first result
WORKER_PING_TIMEOUT_S = 1.0


def _omit_none(description: str | None = None) -> Any:
    """A field left out of the JSON when None."""
    return Field(None, exclude_if=lambda v: v is None, description=description)


class WorkerHealth(BaseModel):
    worker: int
    ok: bool
    error: str | None = _omit_none()
    load_seconds: float | None = _omit_none(description="how long this worker took to load its experts")
    pid: int | None = _omit_none()
    expert_bytes: int | None = _omit_none(description="bytes of the experts it holds, in their stored format")
    routed_around: bool | None = _omit_none(
        description="the frontend that answered leaves it out of routing: it failed or answered a layer late, and "
        "its experts' other copies serve until it answers again"
    )
    merge: dict[str, Any] | None = _omit_none(description="what its merger ran: runs, messages, rows, expert matmuls")


class HealthResponse(BaseModel):
    """ok: every worker answers. degraded: some worker does not; 200 while every expert still has a live copy
    (``expert_replicas`` > 1), 503 with the ``missing_experts`` otherwise. unavailable: the frontend does not answer."""

    status: Literal["ok", "degraded", "unavailable"]
    frontend: str | None = _omit_none(description="the frontend replica that answered")
    workers: list[WorkerHealth] | None = _omit_none()
    missing_experts: list[tuple[int, int]] | None = _omit_none(description="[layer, expert] pairs with no live copy")
    error: str | None = _omit_none()


async def probe(frontend: Any, timeout_s: float = STALE_S) -> tuple[int, HealthResponse]:
    """(HTTP status, body) from one round trip: 503 "unavailable" when the frontend does not answer in time;
    "degraded" when a worker does not: 200 while its experts have live copies elsewhere, else 503 naming the
    missing experts."""
    try:
        h = await asyncio.wait_for(frontend.health.remote(timeout_s=WORKER_PING_TIMEOUT_S), timeout=timeout_s)
    except Exception as e:
        return 503, HealthResponse(status="unavailable", error=type(e).__name__)
    workers = [WorkerHealth.model_validate(w) for w in h["workers"]]
    frontend = h.get("frontend")
    if not h["ok"]:
        missing = [(int(layer), int(e)) for layer, e in h["missing_experts"]]
        return 503, HealthResponse(status="degraded", frontend=frontend, workers=workers, missing_experts=missing)
    fine = all(w.ok and not w.routed_around for w in workers)
    return 200, HealthResponse(status="ok" if fine else "degraded", frontend=frontend, workers=workers)


class HealthMonitor:
    """The latest health of the frontend and its workers, kept fresh by a background task."""

    def __init__(self, frontend: Any) -> None:
        self.frontend = frontend
        self.last: tuple[float, int, HealthResponse] | None = None  # (monotonic time, status, body)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the background checks (on the first /health or /metrics of the replica)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            status, body = await probe(self.frontend)
            self.last = (time.monotonic(), status, body)
            await asyncio.sleep(REFRESH_S)

    def fresh(self) -> tuple[int, HealthResponse] | None:
        """The latest result when it is recent enough, else None."""
        last = self.last
        if last is not None and time.monotonic() - last[0] <= STALE_S:
            return last[1], last[2]
        return None

    async def check(self) -> tuple[int, HealthResponse]:
        """(HTTP status, body), within :data:`FIRST_ANSWER_WAIT_S` seconds."""
        self.start()
        deadline = time.monotonic() + FIRST_ANSWER_WAIT_S
        while (result := self.fresh()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if result is not None:
            return result
        waited = "" if self.last is None else f" for {time.monotonic() - self.last[0]:.0f}s"
        return 503, HealthResponse(status="unavailable", error=f"the frontend has not answered a health check{waited}")

    def latest(self) -> HealthResponse | None:
        """The latest body when it is recent enough (``/metrics`` reads the workers from it), else None."""
        result = self.fresh()
        return None if result is None else result[1]
