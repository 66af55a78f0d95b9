"""Expert transport over ordinary Ray actor calls (object refs): the general fallback.

Per layer, one ``ExpertWorker.run`` call per worker that has rows, all issued before any is awaited. What travels:
the worker's rows of x [N_w, D] in the model dtype (bf16/fp16 as 2 bytes per value) plus the assignment tensors
(rows, experts [A_w] int64, weights [A_w] float32), as torch tensors that Ray pickles into the call; the reply is
the worker's partial output [N_w, D] in the model dtype. The refs are futures: :meth:`RayExperts.start` returns as
soon as the calls are submitted, so two micro-batches can be in flight.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.errors import ExpertWorkerError
from cluster.placement import ExpertPlacement
from router.client import ExpertClient
from router.dispatch import WorkerMessage


class RayExperts(ExpertClient):
    """A worker that died or does not answer within ``timeout_s`` becomes :class:`ExpertWorkerError` naming it, so
    the requests of that step fail fast instead of hanging; an exception raised by a live worker's code propagates
    as Ray's ``RayTaskError`` (a bug: the engine turns it into an ``InternalError`` per request and logs it)."""

    def __init__(
        self,
        placement: ExpertPlacement,
        handles: Sequence[Any],
        *,
        timeout_s: float = 60.0,
        overlap_min_batch: int = 0,
    ) -> None:
        super().__init__(placement)
        self.handles = list(handles)
        self.timeout_s = timeout_s
        self.overlap_min_batch = overlap_min_batch
        self.echo = False  # benchmarks: the workers' echo (same payload back, no compute) instead of run

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> _Refs:
        method = "echo" if self.echo else "run"
        refs = [
            getattr(self.handles[m.worker], method).remote(layer, x[m.tokens], m.rows, m.experts, m.weights)
            for m in messages
        ]
        return _Refs(self, layer, refs, messages)


class _Refs:
    """One layer's calls in flight; :meth:`wait` gets their replies."""

    def __init__(self, client: RayExperts, layer: int, refs: list, messages: list[WorkerMessage]) -> None:
        self.client, self.layer, self.refs, self.messages = client, layer, refs, messages

    def wait(self) -> list[torch.Tensor]:
        layer, refs, messages = self.layer, self.refs, self.messages
        timeout_s = self.client.timeout_s
        deadline = time.monotonic() + timeout_s
        out = []
        for ref, m in zip(refs, messages, strict=True):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except GetTimeoutError:
                for r in refs:
                    ray.cancel(r)
                raise ExpertWorkerError(
                    f"expert worker {m.worker} did not answer layer {layer} within {timeout_s:.0f}s"
                ) from None
            except RayActorError as e:
                raise ExpertWorkerError(
                    f"expert worker {m.worker} is unavailable (it died or is restarting): {type(e).__name__}"
                ) from None
            except RayTaskError:  # the worker is alive but its code raised: a bug, not an outage. The engine logs
                raise  # it with the worker's traceback and fails the step's requests with InternalError
        return out
