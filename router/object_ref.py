"""Expert transport over ordinary Ray actor calls (object refs): the general fallback.

Per layer, one ``ExpertWorker.run_packed`` call per worker that has rows, all issued before any is awaited. What
travels (``router.wire``): one uint8 NumPy array per call holding the worker's rows of x [N_w, D] in the model dtype
(bf16/fp16 as 2 bytes per value) and its assignments as int32/float32; the reply is the partial output [N_w, D] as
raw bytes. Measured on the 2-core box (contended; min / median of 200 echo calls, bench model, W=1): T=8
1.7 / 3.2 ms packed against 3.8 / 6.4 ms for the same message as five pickled torch tensors; T=64 3.4 / 6.6 ms
against 5.7 / 9.7 ms. The refs are futures: :meth:`ObjectRefTransport.start` returns as soon as the calls are
submitted, so two micro-batches can be in flight.

Every call names the worker process it is meant for (its ``incarnation``, learned with one ``status`` call before
the worker's first layer, again after it failed a layer, and for every worker when a step holds only new requests:
``fresh_step``). Ray restarts a dead worker (``max_restarts=-1``) and sends later calls to the new process, which
refuses them (``ExpertWorkerError``): the requests whose layers the dead process served fail, even when Ray restarted
the worker before the next layer was sent or before it reported the failure. (Ray fails a call to a dying or
restarting worker with ``ActorUnavailableError`` only after its grace period for the death information, 1-2 s, and
a small worker is back within about 2 s: without the check such a request went on, on the new process.)

``ActorUnavailableError`` (Ray: the worker is unreachable, maybe restarting; also seen on the first call to a worker
Ray has just restarted, after it answered a ping) is retried once for up to :data:`RETRY_WAIT_S` when the experts
have no other copy (``retry_unavailable``): only the same process can answer it; with copies, the layer fails over
at once.

With copies of experts, a worker left out of routing (``router.replicas``) is probed with ``status`` at most every
:data:`PROBE_INTERVAL_S`; :meth:`ObjectRefTransport.readmit` reports it, with the process that answered, once a probe
returns (Ray restarted it and it reloaded its experts).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from cluster.errors import ExpertWorkerError, ExpertWorkerLate
from router import wire
from router.dispatch import WorkerMessage
from router.transport import RemoteTransport

log = logging.getLogger("mixserve")

PROBE_INTERVAL_S = 0.5
# A live worker answers the retry in milliseconds; a restarted one refuses it (another incarnation).
RETRY_WAIT_S = 0.5


class ObjectRefTransport(RemoteTransport):
    """A worker that died or does not answer within ``timeout_s`` becomes :class:`ExpertWorkerError` naming it, so
    the requests of that step fail fast instead of hanging; so does a layer that reaches a worker Ray restarted (a
    new process) since this transport learned its incarnation. An exception raised by a live worker's code
    propagates as Ray's ``RayTaskError`` (a bug: the engine turns it into an ``InternalError`` per request)."""

    def _init_transport(self) -> None:
        self._probes: dict[int, tuple[float, Any]] = {}  # down worker -> (monotonic time sent, status ref)
        # [W] the worker process each call is meant for (ExpertWorker.status()["incarnation"]); None: not known yet,
        # or the worker failed a layer (its requests failed with it): learned again before its next layer
        self.incarnations: list[str | None] = [None] * len(self.handles)
        self.sender = uuid.uuid4().hex[:12]  # names this frontend's messages to the workers' mergers (their pace)

    def readmit(self, down: set[int]) -> set[int]:
        """The workers of ``down`` whose probe has returned (their new processes are expected from here); the ones
        whose probe failed (still restarting) are probed again after the interval. Never waits."""
        now = time.monotonic()
        back = set()
        for w in sorted(down):
            sent, ref = self._probes.get(w, (0.0, None))
            if ref is not None:
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    status: dict = ray.get(ref)
                except Exception:  # still restarting: probe again after the interval
                    self._probes[w] = (sent, None)
                else:
                    self.incarnations[w] = status["incarnation"]
                    back.add(w)
                    del self._probes[w]
                    continue
            if now - sent >= PROBE_INTERVAL_S:
                self._probes[w] = (now, self.handles[w].status.remote())
        return back

    def fresh_step(self) -> None:
        """No request in flight has used a worker yet: learn every worker's process again before its next layer (a
        worker that died and was restarted while no request used it fails none)."""
        self.incarnations = [None] * len(self.handles)

    def forget(self, worker: int, incarnation: str) -> None:
        """``worker`` failed a layer sent to ``incarnation``: learn its process again before its next layer (the
        failed step's requests fail with it; later ones run on whatever process Ray restarted)."""
        if self.incarnations[worker] == incarnation:
            self.incarnations[worker] = None

    def _expect(self, workers: list[int]) -> list[str | ExpertWorkerError]:
        """The process each worker's call is meant for; the ones not known are asked at once (``status``,
        ``timeout_s`` in all). A worker that does not answer (dead, restarting) gets the :class:`ExpertWorkerError`
        its layer fails with."""
        unknown = sorted({w for w in workers if self.incarnations[w] is None})
        if unknown:
            deadline = time.monotonic() + self.timeout_s
            asked = {w: self.handles[w].status.remote() for w in unknown}
            for w, ref in asked.items():
                try:
                    status: dict = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                    self.incarnations[w] = status["incarnation"]
                except (GetTimeoutError, RayActorError) as e:
                    ray.cancel(ref)
                    log.warning("expert worker %d did not answer a status call (%s)", w, type(e).__name__)
        return [
            known
            if (known := self.incarnations[w]) is not None
            else ExpertWorkerError(f"expert worker {w} is unavailable (it died or is restarting)", worker=w)
            for w in workers
        ]

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> _Refs:
        bufs = [wire.pack(layer, x, m, echo=self.echo) for m in messages]
        expect = self._expect([m.worker for m in messages])
        refs = [
            e if isinstance(e, ExpertWorkerError) else self.handles[m.worker].run_packed.remote(b, e, self.sender)
            for m, b, e in zip(messages, bufs, expect, strict=True)
        ]
        return _Refs(self, layer, refs, messages, x, bufs, expect)


class _Refs:
    """One layer's calls in flight; :meth:`wait` gets their replies. A call that could not be sent (its worker's
    process could not be learned) is its :class:`ExpertWorkerError` in ``refs``, raised by :meth:`wait`."""

    def __init__(
        self,
        client: ObjectRefTransport,
        layer: int,
        refs: list,
        messages: list[WorkerMessage],
        x: torch.Tensor,
        bufs: list[np.ndarray],
        expect: list[str | ExpertWorkerError],
    ) -> None:
        self.client, self.layer, self.refs, self.messages, self.bufs = client, layer, refs, messages, bufs
        self.expect = expect
        self.d, self.dtype, self.device = x.shape[1], x.dtype, x.device

    def _retry(self, i: int, deadline: float, unavailable: ExpertWorkerError) -> np.ndarray | ExpertWorkerError:
        """Send message ``i`` once more after an ``ActorUnavailableError``: Ray can raise it for the first call to
        a worker it has just restarted, though the worker is up. ``unavailable`` when the same process does not
        answer within :data:`RETRY_WAIT_S` (the worker really is down or restarting); the refusal of a restarted
        process (another incarnation: the one that served the earlier layers died). The step fails either way."""
        ref = self.client.handles[self.messages[i].worker].run_packed.remote(
            self.bufs[i], self.expect[i], self.client.sender
        )
        try:
            return ray.get(ref, timeout=max(0.0, min(RETRY_WAIT_S, deadline - time.monotonic())))
        except (GetTimeoutError, RayActorError):
            ray.cancel(ref)
            return unavailable
        except RayTaskError as e:
            if isinstance(e.cause, ExpertWorkerError):
                return e.cause
            raise

    def _fail(self, error: ExpertWorkerError, i: int, *, cancel: bool = False) -> ExpertWorkerError:
        """The error message ``i`` fails the layer with; its worker's process is learned again before its next
        layer. ``cancel``: cancel the layer's calls too (a worker that does not answer)."""
        if cancel:
            for r in self.refs:
                if not isinstance(r, ExpertWorkerError):
                    ray.cancel(r)
        expect = self.expect[i]
        if isinstance(expect, str):
            self.client.forget(self.messages[i].worker, expect)
        return error

    def _reply(self, i: int, deadline: float, late_at: float | None) -> np.ndarray:
        """Message ``i``'s reply, or the :class:`ExpertWorkerError` its worker fails the layer with
        (:class:`ExpertWorkerLate` when ``late_at`` comes first: the caller has other copies to send it to)."""
        ref, m = self.refs[i], self.messages[i]
        if isinstance(ref, ExpertWorkerError):
            raise self._fail(ref, i)
        until = deadline if late_at is None else min(late_at, deadline)
        hedge = until < deadline
        try:
            return ray.get(ref, timeout=max(0.0, until - time.monotonic()))
        except GetTimeoutError:
            if hedge:
                ray.cancel(ref)
                raise ExpertWorkerLate(
                    f"expert worker {m.worker} has not answered layer {self.layer} in the time its exchanges usually "
                    "take; the layer goes to the other copies of its experts",
                    worker=m.worker,
                ) from None
            timeout_s = self.client.timeout_s
            error = ExpertWorkerError(
                f"expert worker {m.worker} did not answer layer {self.layer} within {timeout_s:.0f}s", worker=m.worker
            )
            raise self._fail(error, i, cancel=True) from None
        except RayActorError as e:
            unavailable = ExpertWorkerError(
                f"expert worker {m.worker} is unavailable (it died or is restarting): {type(e).__name__}",
                worker=m.worker,
            )
            retry = isinstance(e, ActorUnavailableError) and self.client.retry_unavailable
            again = self._retry(i, deadline, unavailable) if retry else unavailable
            if isinstance(again, ExpertWorkerError):
                raise self._fail(again, i) from None
            return again
        except RayTaskError as e:
            if isinstance(e.cause, ExpertWorkerError):  # a restarted worker refused the layer: its process died
                raise self._fail(e.cause, i) from None
            raise  # the worker is alive but its code raised: a bug, not an outage. The engine logs it with the
            # worker's traceback and fails the step's requests with InternalError

    def wait(self, late_at: float | None = None) -> list[torch.Tensor]:
        deadline = time.monotonic() + self.client.timeout_s
        out = []
        for i, m in enumerate(self.messages):
            reply = self._reply(i, deadline, late_at)
            out.append(wire.unpack_rows(reply, int(m.tokens.numel()), self.d, self.dtype).to(self.device))
        return out
