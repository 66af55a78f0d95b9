"""Expert transport over ordinary Ray actor calls (object refs): the general fallback.

Per layer, one ``ExpertWorker.run_packed`` call per worker that has rows, all issued before any is awaited. What
travels (``router.wire``): one uint8 NumPy array per call holding the worker's rows of x [N_w, D] in the model dtype
(bf16/fp16 as 2 bytes per value) and its assignments as int32/float32; the reply is the partial output [N_w, D] as
raw bytes. Measured on the 2-core box (contended; min / median of 200 echo calls, bench model, W=1): T=8
1.7 / 3.2 ms packed against 3.8 / 6.4 ms for the same message as five pickled torch tensors; T=64 3.4 / 6.6 ms
against 5.7 / 9.7 ms. The refs are futures: :meth:`ObjectRefTransport.start` returns as soon as the calls are submitted,
so two micro-batches can be in flight.

``ActorUnavailableError`` (Ray: the worker is unreachable, maybe restarting; also seen on the first call to a worker
Ray has just restarted, after it answered a ping) is retried once for up to :data:`RETRY_WAIT_S` when the experts
have no other copy (``retry_unavailable``); with copies, the layer fails over at once.

With copies of experts, a worker left out of routing (``router.replicas``) is probed with ``ping`` at most every
:data:`PROBE_INTERVAL_S`; :meth:`ObjectRefTransport.readmit` reports it once a ping returns (Ray restarted it and it
reloaded its experts).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from cluster.errors import ExpertWorkerError
from router import wire
from router.dispatch import WorkerMessage
from router.transport import RemoteTransport

log = logging.getLogger("mixserve")

PROBE_INTERVAL_S = 0.5
# A live worker answers the retry in milliseconds; a restarting one cannot (a new process imports torch and loads
# its experts: seconds), so the retry never turns into waiting for a restart.
RETRY_WAIT_S = 0.5


class ObjectRefTransport(RemoteTransport):
    """A worker that died or does not answer within ``timeout_s`` becomes :class:`ExpertWorkerError` naming it, so
    the requests of that step fail fast instead of hanging; an exception raised by a live worker's code propagates
    as Ray's ``RayTaskError`` (a bug: the engine turns it into an ``InternalError`` per request and logs it)."""

    def _init_transport(self) -> None:
        self._probes: dict[int, tuple[float, Any]] = {}  # down worker -> (monotonic time sent, ping ref)

    def readmit(self, down: set[int]) -> set[int]:
        """The workers of ``down`` whose ping has returned; the ones whose ping failed (still restarting) are pinged
        again after the interval. Never waits."""
        now = time.monotonic()
        back = set()
        for w in sorted(down):
            sent, ref = self._probes.get(w, (0.0, None))
            if ref is not None:
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    ray.get(ref)
                except Exception:  # still restarting: ping again after the interval
                    self._probes[w] = (sent, None)
                else:
                    back.add(w)
                    del self._probes[w]
                    continue
            if now - sent >= PROBE_INTERVAL_S:
                self._probes[w] = (now, self.handles[w].ping.remote())
        return back

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> _Refs:
        bufs = [wire.pack(layer, x, m, echo=self.echo) for m in messages]
        refs = [self.handles[m.worker].run_packed.remote(b) for m, b in zip(messages, bufs, strict=True)]
        return _Refs(self, layer, refs, messages, x, bufs)


class _Refs:
    """One layer's calls in flight; :meth:`wait` gets their replies."""

    def __init__(
        self,
        client: ObjectRefTransport,
        layer: int,
        refs: list,
        messages: list[WorkerMessage],
        x: torch.Tensor,
        bufs: list[np.ndarray],
    ) -> None:
        self.client, self.layer, self.refs, self.messages, self.bufs = client, layer, refs, messages, bufs
        self.d, self.dtype, self.device = x.shape[1], x.dtype, x.device

    def _retry(self, i: int, deadline: float) -> np.ndarray | None:
        """Send message ``i`` once more after an ``ActorUnavailableError``: Ray can raise it for the first call to
        a worker it has just restarted, though the worker is up. None when the copy does not answer within
        :data:`RETRY_WAIT_S` either (the worker really is down or restarting: the step fails)."""
        ref = self.client.handles[self.messages[i].worker].run_packed.remote(self.bufs[i])
        try:
            return ray.get(ref, timeout=max(0.0, min(RETRY_WAIT_S, deadline - time.monotonic())))
        except (GetTimeoutError, RayActorError):
            ray.cancel(ref)
            return None

    def wait(self) -> list[torch.Tensor]:
        layer, refs, messages = self.layer, self.refs, self.messages
        timeout_s = self.client.timeout_s
        deadline = time.monotonic() + timeout_s
        out = []
        for i, (ref, m) in enumerate(zip(refs, messages, strict=True)):
            try:
                reply: np.ndarray = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                for r in refs:
                    ray.cancel(r)
                raise ExpertWorkerError(
                    f"expert worker {m.worker} did not answer layer {layer} within {timeout_s:.0f}s", worker=m.worker
                ) from None
            except RayActorError as e:
                retry = isinstance(e, ActorUnavailableError) and self.client.retry_unavailable
                if retry and (again := self._retry(i, deadline)) is not None:
                    out.append(wire.unpack_rows(again, int(m.tokens.numel()), self.d, self.dtype).to(self.device))
                    continue
                raise ExpertWorkerError(
                    f"expert worker {m.worker} is unavailable (it died or is restarting): {type(e).__name__}",
                    worker=m.worker,
                ) from None
            except RayTaskError:  # the worker is alive but its code raised: a bug, not an outage. The engine logs
                raise  # it with the worker's traceback and fails the step's requests with InternalError
            n = int(m.tokens.numel())
            out.append(wire.unpack_rows(reply, n, self.d, self.dtype).to(self.device))
        return out
