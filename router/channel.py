"""Expert transport over Ray Compiled Graph channels: the frontend and its workers are wired once into a static
graph (``ray.dag``: the input's element w goes to worker w's ``run_packed``, every reply comes back to the
frontend); each layer is then one ``execute`` that writes one message per worker into shared memory and reads the
replies from shared memory, with no task submission, scheduling or object store on the way.

What travels (``router.wire``): per worker one flat uint8 NumPy array holding its rows of x [N_w, D] in the model
dtype (bf16/fp16 as 2 bytes per value) and its assignments as int32/float32; the reply is the partial output
[N_w, D] as raw bytes. A worker with no rows in a layer still gets a message in the static graph: ``None``
(a few bytes) and replies ``None``. Measured on the 2-core box (contended, medians): a 16 KB / 256 KB round trip
as one NumPy array 0.42 / 1.2 ms, as a torch tensor 1.5 / 1.9 ms, as a tuple of five arrays 0.66 / 2.8 ms; an
actor call 2.0-3.4 / 7.9-9.0 ms.

GPUs: tensors hop through host shared memory (the frontend copies the rows to the CPU, the worker to its GPU).
NCCL channels would need the frontend inside the graph as an actor (Ray refuses a driver in a communicator
group); see the README's limitations.

Faults: a reply that does not come within ``timeout_s``, or a worker that died, fails the layer with
:class:`ExpertWorkerError` (within about a second of the death: Ray reports the actor unavailable); the graph is
torn down and compiled again on the next call, once every worker answers (Ray restarts dead workers); a worker
that dies while the graph is being compiled fails that call instead of leaving a graph that waits on it.
An exception raised by a live worker's code comes back as Ray's ``RayTaskError`` (a bug, not an outage).

One graph per set of workers at a time: an actor cannot serve two compiled graphs.

Shapes: T tokens in the step, D hidden, N_w rows sent to worker w.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayChannelError,
    RayChannelTimeoutError,
    RayTaskError,
)

from cluster.errors import ExpertWorkerError
from router import wire
from router.dispatch import WorkerMessage
from router.transport import RemoteTransport

log = logging.getLogger("mixserve")

MAX_INFLIGHT = 4  # executions sent before their replies are read (two micro-batches need 2)


class ChannelTransport(RemoteTransport):
    """Not thread-safe: one engine thread drives it (as it drives the model)."""

    def _init_transport(self) -> None:
        self._graph: Any = None
        self._generation = 0  # bumped whenever the graph is dropped: replies of an older graph never come
        self._teardown: threading.Thread | None = None  # a failed graph being torn down in the background
        self._lock = threading.Lock()

    # -- the graph ---------------------------------------------------------------------------------------------
    def _compiled(self) -> Any:
        with self._lock:
            if self._graph is None:
                if self._teardown is not None:  # an actor serves one graph at a time: the old one must be gone
                    self._teardown.join(timeout=self.timeout_s)
                    self._teardown = None
                before = self._pids()  # a restarted worker must be up (it reloads its experts) to join a graph
                with InputNode() as inp:
                    dag = MultiOutputNode([h.run_packed.bind(inp[w]) for w, h in enumerate(self.handles)])
                try:
                    graph = dag.experimental_compile(
                        _submit_timeout=self.timeout_s, _max_inflight_executions=MAX_INFLIGHT
                    )
                except (RayActorError, RayChannelError, GetTimeoutError) as e:
                    worker = self._worker_of(e)
                    who = "an expert worker" if worker is None else f"expert worker {worker}"
                    raise ExpertWorkerError(
                        f"{who} failed while the channel graph was being compiled: {type(e).__name__}", worker=worker
                    ) from None
                # A worker that died while the graph was being compiled leaves Ray's graph waiting on a process that
                # is gone: its first read would block for ~20 s before Ray notices. The workers answer ordinary
                # calls beside the graph's loop, so ask again: the same processes must still be there.
                try:
                    after = self._pids()
                except ExpertWorkerError:
                    after = None
                if after != before:  # torn down in the background, as after any failure
                    self._teardown = threading.Thread(target=_teardown, args=(graph,), daemon=True)
                    self._teardown.start()
                    if after is None:
                        raise ExpertWorkerError(
                            "expert workers did not all answer after the channel graph was compiled"
                        )
                    died = [w for w, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
                    raise ExpertWorkerError(
                        f"expert workers {died} died while the channel graph was being compiled",
                        worker=died[0] if len(died) == 1 else None,
                    )
                self._graph = graph
            return self._graph

    def _pids(self) -> list[int]:
        """Each worker's process id, once every worker answers within the timeout. A worker Ray is restarting
        can answer ``ActorUnavailableError`` before it is back: asked again until the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                refs = [h.status.remote() for h in self.handles]
                replies = ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))  # never < 0: Ray's "forever"
                return [s["pid"] for s in replies]
            except ActorUnavailableError as e:
                if time.monotonic() + 0.2 >= deadline:
                    raise self._unavailable(e) from None
                time.sleep(0.2)
            except (GetTimeoutError, RayActorError) as e:
                raise self._unavailable(e) from None

    @staticmethod
    def _unavailable(e: Exception) -> ExpertWorkerError:
        return ExpertWorkerError(f"expert workers are unavailable (one died or is restarting): {type(e).__name__}")

    def connect(self) -> None:
        """Compile the graph now, so the first request does not wait for it. A worker that is down (or dies
        meanwhile) does not fail the frontend's start: the graph is then compiled by the first request."""
        try:
            self._compiled()
        except ExpertWorkerError as e:
            log.warning("channel graph not compiled at start (%s); the first request compiles it", e)

    def close(self) -> None:
        """Tear the graph down (the workers stay up and serve ordinary calls again)."""
        with self._lock:
            graph, self._graph = self._graph, None
            self._generation += 1
            pending, self._teardown = self._teardown, None
        if pending is not None:
            pending.join(timeout=self.timeout_s)
        if graph is not None:
            _teardown(graph)

    def _broken(self, layer: int, e: Exception) -> ExpertWorkerError:
        """Drop the graph after a failure and say which worker failed. The teardown runs in the background (it
        waits on the actors, a restarting one included), so the step fails at once; the next call waits for it
        and compiles a new graph."""
        with self._lock:
            graph, self._graph = self._graph, None
            self._generation += 1
            if graph is not None:
                self._teardown = threading.Thread(target=_teardown, args=(graph,), name="channel-teardown", daemon=True)
                self._teardown.start()
        worker = self._worker_of(e)
        who = "an expert worker" if worker is None else f"expert worker {worker}"
        if isinstance(e, (RayChannelTimeoutError, GetTimeoutError)):
            return ExpertWorkerError(f"{who} did not answer layer {layer} within {self.timeout_s:.0f}s")
        return ExpertWorkerError(
            f"{who} is unavailable on layer {layer} (it died or is restarting): {type(e).__name__}"
        )

    def _worker_of(self, e: Exception) -> int | None:
        """The worker a Ray error names, if it names one of ours."""
        return next((w for w, h in enumerate(self.handles) if _actor_id(h) == getattr(e, "actor_id", None)), None)

    # -- the ExpertClient interface ----------------------------------------------------------------------------
    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> _Flight:
        graph = self._compiled()
        args: list[np.ndarray | None] = [None] * len(self.handles)
        for m in messages:
            if m.tokens.numel():
                args[m.worker] = wire.pack(layer, x, m, echo=self.echo)
        try:
            refs = graph.execute(*args)
        except (RayChannelError, RayActorError) as e:
            raise self._broken(layer, e) from None
        return _Flight(self, layer, refs, messages, x, self._generation)


class _Flight:
    """One execution of the graph: :meth:`wait` reads every worker's reply."""

    def __init__(
        self,
        client: ChannelTransport,
        layer: int,
        refs: list,
        messages: list[WorkerMessage],
        x: torch.Tensor,
        generation: int,
    ) -> None:
        self.client, self.layer, self.refs, self.messages = client, layer, refs, messages
        self.d, self.dtype, self.device = x.shape[1], x.dtype, x.device
        self.generation = generation

    def wait(self, late_at: float | None = None) -> list[torch.Tensor]:
        """Every worker's reply (``late_at`` is not used: a compiled graph's replies come together)."""
        c = self.client
        if c._generation != self.generation:  # another layer in flight failed and the graph is gone
            raise ExpertWorkerError(f"layer {self.layer} was in flight on a channel graph torn down after a failure")
        try:
            replies = ray.get(self.refs, timeout=c.timeout_s)
        except RayTaskError:  # the worker is alive but its code raised: a bug, not an outage
            raise
        except (RayChannelError, RayActorError, GetTimeoutError) as e:
            raise c._broken(self.layer, e) from None
        out = []
        for m in self.messages:
            n = int(m.tokens.numel())
            reply = replies[m.worker]
            if reply is None:  # only a message with no rows gets no reply
                out.append(torch.zeros(n, self.d, dtype=self.dtype, device=self.device))
            else:
                out.append(wire.unpack_rows(reply, n, self.d, self.dtype).to(self.device))
        return out


def _teardown(graph: Any) -> None:
    try:
        graph.teardown()
    except Exception as e:  # the graph is dropped either way; a dead actor's loop is gone with it
        log.debug("channel graph teardown: %r", e)


def _actor_id(handle: Any) -> str | None:
    with contextlib.suppress(Exception):
        return handle._actor_id.hex()
    return None
