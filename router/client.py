"""The one interface between the frontend's MoE blocks and the experts: :class:`ExpertClient`.

A client turns one layer's routing into one message per worker (its :class:`~router.replicas.ReplicaRouter`, which
also handles copies of experts and failover), has its :class:`~router.transport.Transport` move the messages to the
workers and the partial outputs back, and sums the partials into the layer's output (:func:`router.dispatch.combine`).

Two ways to call it: :meth:`ExpertClient.forward` (blocking) or :meth:`ExpertClient.submit`, which returns as soon
as the messages are on their way; :meth:`Pending.result` waits for the partials and combines them. The model uses
``submit`` to keep two micro-batches in flight (the frontend computes one while the workers run the other).

Example (W = 0, the reference path): ``ExpertClient(placement, LocalTransport({0: shard})).forward(layer, x, routing)``.

Shapes: T tokens, D hidden, K experts per token, N_w distinct tokens sent to worker w.
"""

from __future__ import annotations

import contextlib
import time

import torch

from cluster.errors import ExpertWorkerError
from router import dispatch
from router.dispatch import WorkerMessage
from router.gate import Routing
from router.latency import Lateness
from router.placement import ExpertPlacement
from router.replicas import ReplicaRouter
from router.transport import Exchange, Transport


class Pending:
    """One layer's expert output in flight: :meth:`result` waits and returns the combined output [T, D]."""

    def __init__(self, *, client: ExpertClient, layer: int, x: torch.Tensor, routing: Routing) -> None:
        self.client, self.layer, self.x, self.routing = client, layer, x, routing
        self.transport = client.transport  # the one this layer started on, even if the client's is replaced
        self.messages = client.plan(layer, routing)
        self.sent = time.monotonic()
        self.exchange: Exchange = self.transport.start(layer, x, self.messages)

    def _late_at(self) -> float | None:
        """When a reply counts as late (copies of experts only: there is somewhere else to send the layer)."""
        bound = self.client.lateness.bound() if self.client.placement.replicas > 1 else None
        return None if bound is None else self.sent + bound

    def result(self) -> torch.Tensor:
        """The combined output; a worker that fails the layer, or answers late, is failed over to the other copies
        of its experts (at most once per worker), else its :class:`ExpertWorkerError` propagates."""
        client = self.client
        t0 = time.perf_counter()
        clean = True
        try:
            for _ in range(client.placement.num_workers):
                try:
                    partials = self.exchange.wait(self._late_at())
                    break
                except ExpertWorkerError as e:
                    if not client.router.fail_over(e):
                        raise
                    clean = False
                    self.messages = client.plan(self.layer, self.routing)
                    self.sent = time.monotonic()
                    self.exchange = self.transport.start(self.layer, self.x, self.messages)
            else:
                partials = self.exchange.wait()
        finally:
            client.waited_s += time.perf_counter() - t0
        if clean and client.placement.replicas > 1:  # the bound is used only where there are copies to hedge to
            client.lateness.record(time.monotonic() - self.sent)
        return dispatch.combine(self.messages, partials, like=self.x)

    def discard(self) -> None:
        """Wait for the exchange and drop what comes back (a step that fails must not leave replies unread)."""
        with contextlib.suppress(Exception):
            self.exchange.wait()


class ExpertClient:
    """Dispatch a layer's rows to the workers that hold their experts and combine what comes back."""

    def __init__(self, placement: ExpertPlacement, transport: Transport) -> None:
        self.placement = placement
        self.router = ReplicaRouter(placement)
        self.transport = transport
        self.waited_s = 0.0  # seconds spent in Pending.result waiting for replies (benchmarks read it)
        self.lateness = Lateness()  # when a reply counts as late (hedged dispatch over copies of experts)

    @property
    def overlap_min_batch(self) -> int:
        """Steps of at least this many tokens run as two micro-batches in flight (0: off); the transport's."""
        return self.transport.overlap_min_batch

    @overlap_min_batch.setter
    def overlap_min_batch(self, value: int) -> None:
        self.transport.overlap_min_batch = value

    @property
    def failovers(self) -> int:
        return self.router.failovers

    @property
    def hedges(self) -> int:
        """Layers sent to other copies because a worker answered late (counted in ``failovers`` too)."""
        return self.router.hedges

    def take_back(self) -> None:
        """Route again to the left-out workers that answer again (the health check calls it: an idle frontend has no
        layer plans that would)."""
        if self.placement.replicas > 1:
            self.router.take_back(self.transport.readmit)

    @property
    def down(self) -> set[int]:
        """Workers left out after failing a layer, until the transport says they answer again."""
        return self.router.down

    def plan(self, layer: int, routing: Routing) -> list[WorkerMessage]:
        """routing.ids/weights [T, K] -> one message per worker that has rows (see ``router.replicas``)."""
        return self.router.plan(layer, routing, self.transport.readmit)

    def submit(self, layer: int, x: torch.Tensor, routing: Routing) -> Pending:
        """x [T, D] normalised hidden states, routing.ids/weights [T, K] -> the layer's output in flight."""
        return Pending(client=self, layer=layer, x=x, routing=routing)

    def forward(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, D] normalised hidden states, routing.ids/weights [T, K] -> weighted expert output [T, D]."""
        return self.submit(layer, x, routing).result()

    def exchange(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        """Send each message's rows of x [T, D] to its worker; one [N_w, D] partial per message, in order."""
        return self.transport.start(layer, x, messages).wait()

    def replace_transport(self, transport: Transport) -> Transport:
        """Route every later layer over ``transport`` (e.g. to workers that replaced dead ones); returns the old
        one, for the caller to close. Layers already in flight finish on the transport they started on."""
        transport.overlap_min_batch = self.transport.overlap_min_batch
        old, self.transport = self.transport, transport
        return old

    def fresh_step(self) -> None:
        """See :meth:`router.transport.Transport.fresh_step` (the model runner calls it for a batch of new requests)."""
        self.transport.fresh_step()

    def connect(self) -> None:
        self.transport.connect()

    def close(self) -> None:
        self.transport.close()
