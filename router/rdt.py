"""Token all-to-all over Ray Direct Transport: tensors move actor-to-actor over a collective group
(gloo on CPU, nccl on GPU) instead of through the object store.

RDT objects on a two-sided transport can only be passed from one actor task to another, never fetched with
``ray.get``. So per layer and worker the frontend (a threaded actor, in the group with its workers) runs three
small tasks: ``stage`` on itself returns the rows for that worker as an RDT object; the worker's ``run``
takes it and returns its partial output as an RDT object; ``absorb`` on the frontend takes that and parks it
where the waiting layer picks it up. Every call of a layer is issued before any is awaited, and
:meth:`RdtTransport.start` returns once they are issued.

One micro-batch's transfers at a time: with two micro-batches, :meth:`RdtTransport.start` first waits until the
other one's partials have landed. Ray queues each transfer's send and receive on the two actors' single system
threads from whichever thread resolves it, so transfers of two micro-batches between the same pair of actors, in
opposite directions, can be queued in opposite orders on the two ends and wait on each other until Ray's RDT timeout
(60 s; seen as ``RayTaskError(TimeoutError)``). Within one micro-batch a worker's queue holds only its receive and,
after its ``run``, its send, so the queues always drain. The frontend's attention for one micro-batch still runs while
the workers compute the other's experts.

The frontend's own tasks are its host hooks (:class:`RdtHostHooks`, the registry row's ``host_hooks``): the actor
that drives this transport includes that mixin and provides ``expert_transport()``. The group is created on first
use from inside that actor (the process that submits the transfers must know it); a failed creation is tried
once more, then fails the layer as an ``ExpertWorkerError``. Ray stops both ends of a failed
transfer (the frontend actor included), so after a failure the whole frontend and its workers are replaced.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.experimental.collective import create_collective_group, destroy_collective_group, get_collective_groups

from cluster.errors import ExpertWorkerError
from router.dispatch import WorkerMessage
from router.transport import RemoteTransport

log = logging.getLogger("mixserve")


class RdtTransport(RemoteTransport):
    """Base of the two RDT transports; ``backend`` is the tensor transport Ray uses, ``group_backend`` the
    collective group's backend."""

    backend = ""
    group_backend = ""

    def _init_transport(self) -> None:
        self._group = None
        self._staged: dict[int, torch.Tensor] = {}
        self._received: dict[int, torch.Tensor] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._in_flight: list[Any] = []  # the absorb refs of the last start()

    # -- called on the host actor through its own handle (RdtHostHooks) -----------------------------------------
    def stage(self, key: int) -> torch.Tensor:
        return self._staged.pop(key)

    def absorb(self, key: int, partial: torch.Tensor) -> bool:
        self._received[key] = partial
        return True

    # -- the Transport interface -------------------------------------------------------------------------------
    def _me(self) -> Any:
        return ray.get_runtime_context().current_actor

    def _ensure_group(self) -> None:
        with self._lock:
            if self._group is not None:
                return
            # A restarted worker must be up before it can join; its old group (if any) is gone with it.
            ray.get([h.ping.remote() for h in self.handles], timeout=self.timeout_s)
            self._group = self._form_group()

    def _form_group(self) -> Any:
        """A new collective group of this actor and its workers, whatever was left of an old one destroyed first. A
        failed try is logged and tried once more (forming a group can fail under load: a rank's rendezvous times out,
        a port is taken before it is bound); a second failure is an :class:`ExpertWorkerError` naming the cause."""
        error: Exception | None = None
        for _ in range(2):
            for g in get_collective_groups([self._me()]):
                with contextlib.suppress(Exception):
                    destroy_collective_group(g)
            try:
                return create_collective_group([self._me(), *self.handles], backend=self.group_backend)
            except (GetTimeoutError, RayActorError):
                raise  # a worker is gone: start() reports the outage
            except Exception as e:  # Ray raises RayTaskError, RuntimeError, TimeoutError, ...
                if error is None:
                    log.warning("forming the RDT/%s collective group failed (%s: %s); trying once more",
                                self.backend, type(e).__name__, e)  # fmt: skip
                error = e
        raise ExpertWorkerError(
            f"could not form the RDT/{self.backend} collective group with the expert workers (tried twice): "
            f"{type(error).__name__}: {error}"
        )

    def _invalidate(self) -> None:
        with self._lock:
            self._group = None
        self._staged.clear()
        self._received.clear()
        self._in_flight = []

    def _drain(self) -> None:
        """Wait (up to ``timeout_s``) until the last start's partials have landed, so two micro-batches' transfers
        are never queued together (see the module docstring). A transfer that failed is raised by the layer it
        belongs to (:meth:`_Transfers.wait`); one still pending after ``timeout_s`` fails this layer instead of
        sending beside it."""
        if not self._in_flight:
            return
        waiting = len(self._in_flight)
        ready, _ = ray.wait(self._in_flight, num_returns=waiting, timeout=self.timeout_s)
        self._in_flight = []
        if len(ready) < waiting:
            self._invalidate()
            raise ExpertWorkerError(
                f"expert workers did not return the other micro-batch's partials over RDT/{self.backend} within "
                f"{self.timeout_s:g} s"
            )

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> _Transfers:
        try:
            self._ensure_group()
        except (GetTimeoutError, RayActorError) as e:  # a worker is gone or not back yet: an outage (503)
            raise ExpertWorkerError(f"expert workers unavailable for the RDT collective group: {e!r}") from None
        self._drain()
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
        self._in_flight = list(done)
        return _Transfers(self, layer, done, keys)


class GlooTransport(RdtTransport):
    backend = "gloo"
    group_backend = "torch_gloo"


class NcclTransport(RdtTransport):
    backend = "nccl"
    group_backend = "nccl"


class RdtHostHooks:
    """Mixin for the actor that drives an :class:`RdtTransport`: the frontend's own tasks that hand tensors to and
    from the collective group. The actor provides ``expert_transport()``, the transport it drives."""

    def rdt_stage(self, key: int) -> torch.Tensor:
        return self._rdt().stage(key)

    def rdt_absorb(self, key: int, partial: torch.Tensor) -> bool:
        return self._rdt().absorb(key, partial)

    def _rdt(self) -> RdtTransport:
        transport = getattr(self, "expert_transport")()  # noqa: B009 (the host's method, not the mixin's)
        assert isinstance(transport, RdtTransport), "RDT hooks are called only by an RDT transport"
        return transport


class _Transfers:
    """One layer's RDT transfers in flight; :meth:`wait` collects the partials the frontend absorbed."""

    def __init__(self, client: RdtTransport, layer: int, done: list, keys: list[tuple[int, int]]) -> None:
        self.client, self.layer, self.done, self.keys = client, layer, done, keys

    def wait(self, late_at: float | None = None) -> list[torch.Tensor]:
        """The partials the frontend absorbed (``late_at`` is not used: RDT has no copies to go to)."""
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
