"""Token all-to-all over Ray Direct Transport: tensors move actor-to-actor over a collective group
(gloo on CPU, nccl on GPU) instead of through the object store.

RDT objects on a two-sided transport can only be passed from one actor task to another, never fetched with
``ray.get``. So per layer and worker the frontend (a threaded actor, in the group with its workers) runs three
small tasks: ``stage`` on itself returns the rows for that worker as an RDT object; the worker's ``run``
takes it and returns its partial output as an RDT object; ``absorb`` on the frontend takes that and parks it
where the waiting layer picks it up. Every call of a layer is issued before any is awaited, and
:meth:`RdtExperts.start` returns once they are issued (two micro-batches can be in flight).

The group is created on first use from inside the frontend (the process that submits the transfers must know
it), and rebuilt after a worker restarts.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.experimental.collective import create_collective_group, destroy_collective_group, get_collective_groups

from cluster.errors import ExpertWorkerError
from cluster.placement import ExpertPlacement
from router.client import RemoteExperts
from router.dispatch import WorkerMessage

BACKENDS = {"gloo": "torch_gloo", "nccl": "nccl"}


class RdtExperts(RemoteExperts):
    """The frontend actor that owns this client must expose ``rdt_stage(key)`` and ``rdt_absorb(key, partial)``
    methods that call :meth:`stage` and :meth:`absorb` (see ``cluster.cluster.FrontendActor``)."""

    def __init__(
        self,
        placement: ExpertPlacement,
        handles: Sequence[Any],
        *,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        overlap_min_batch: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"RDT backend {backend!r} is unknown; use gloo or nccl")
        super().__init__(placement, handles, timeout_s=timeout_s, overlap_min_batch=overlap_min_batch)
        self.backend = backend
        self._group = None
        self._staged: dict[int, torch.Tensor] = {}
        self._received: dict[int, torch.Tensor] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    # -- called on the frontend actor through its own handle (its rdt_stage / rdt_absorb methods) -------------
    def stage(self, key: int) -> torch.Tensor:
        return self._staged.pop(key)

    def absorb(self, key: int, partial: torch.Tensor) -> bool:
        self._received[key] = partial
        return True

    # -- the ExpertClient interface ----------------------------------------------------------------------------
    def _me(self) -> Any:
        return ray.get_runtime_context().current_actor

    def _ensure_group(self) -> None:
        with self._lock:
            if self._group is not None:
                return
            # A restarted worker must be up before it can join; its old group (if any) is gone with it.
            ray.get([h.ping.remote() for h in self.handles], timeout=self.timeout_s)
            for g in get_collective_groups([self._me()]):
                with contextlib.suppress(Exception):
                    destroy_collective_group(g)
            self._group = create_collective_group([self._me(), *self.handles], backend=BACKENDS[self.backend])

    def _invalidate(self) -> None:
        with self._lock:
            self._group = None
        self._staged.clear()
        self._received.clear()

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> _Transfers:
        try:
            self._ensure_group()
        except Exception as e:
            raise ExpertWorkerError(f"expert workers unavailable for the RDT collective group: {e!r}") from None
        me = self._me()
        method = "echo" if self.echo else "run"
        done, keys = [], []
        for m in messages:
            key = next(self._ids)
            self._staged[key] = x[m.tokens].contiguous()
            x_ref = me.rdt_stage.options(tensor_transport=self.backend).remote(key)
            out_ref = (
                getattr(self.handles[m.worker], method)
                .options(tensor_transport=self.backend)
                .remote(layer, x_ref, m.rows, m.experts, m.weights)
            )
            done.append(me.rdt_absorb.remote(key, out_ref))
            keys.append((key, m.worker))
        return _Transfers(self, layer, done, keys)


class _Transfers:
    """One layer's RDT transfers in flight; :meth:`wait` collects the partials the frontend absorbed."""

    def __init__(self, client: RdtExperts, layer: int, done: list, keys: list[tuple[int, int]]) -> None:
        self.client, self.layer, self.done, self.keys = client, layer, done, keys

    def wait(self) -> list[torch.Tensor]:
        c = self.client
        deadline = time.monotonic() + c.timeout_s
        for ref, (_, worker) in zip(self.done, self.keys, strict=True):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (GetTimeoutError, RayActorError, RayTaskError) as e:
                c._invalidate()
                raise ExpertWorkerError(
                    f"expert worker {worker} failed on layer {self.layer} over RDT/{c.backend}: {type(e).__name__}"
                ) from None
        return [c._received.pop(k) for k, _ in self.keys]
