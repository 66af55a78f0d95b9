"""How one layer's messages reach the expert workers and their partial outputs come back: :class:`Transport`.

A transport only moves messages: :meth:`Transport.start` puts each :class:`~router.dispatch.WorkerMessage`'s rows
of x on its way to its worker and returns an :class:`Exchange` whose ``wait`` gives one partial per message. Which
worker gets which rows, and what happens when a worker fails, is ``router.replicas``; planning and combining is
``router.client.ExpertClient``, which holds one transport.

Implementations: :class:`LocalTransport` here (in-process shards, no Ray: W = 0, the reference path) and, over
Ray, the rows of the registry (``cluster.config.transports``): ``router.object_ref``, ``router.channel``,
``router.rdt``. A remote transport fails a layer with :class:`~cluster.errors.ExpertWorkerError` naming the
worker when the worker died or did not answer within ``timeout_s``; a bug in a live worker's code propagates as
it is (the engine turns it into an internal error).

Shapes: T tokens in the step, D hidden, N_w rows sent to worker w.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from router.dispatch import WorkerMessage


class Exchange(Protocol):
    """A layer's messages on their way: :meth:`wait` returns one [N_w, D] partial per message, in order.
    ``late_at`` (``time.monotonic()``): a transport that can tell raises :class:`~cluster.errors.ExpertWorkerLate`
    for a worker whose reply has not come by then (the client then sends the layer to other copies); others wait."""

    def wait(self, late_at: float | None = None) -> list[torch.Tensor]: ...


class Done:
    """An exchange that has already finished (in-process experts)."""

    def __init__(self, partials: list[torch.Tensor]) -> None:
        self.partials = partials

    def wait(self, late_at: float | None = None) -> list[torch.Tensor]:
        return self.partials


class Transport(ABC):
    """Moves a layer's messages to the workers and the partials back.

    ``overlap_min_batch``: steps of at least this many tokens are run by the model as two micro-batches in flight
    (``workers.model``); 0 turns it off. Only transports whose :meth:`start` returns before the workers finish gain
    from it, so the in-process one keeps 0.
    """

    overlap_min_batch: int = 0

    @abstractmethod
    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> Exchange:
        """Put each message's rows of x [T, D] on its way to its worker; return without waiting for the replies."""

    def readmit(self, down: set[int]) -> set[int]:
        """The workers of ``down`` (left out after failing a layer) known to answer again; never waits. A transport
        that cannot probe its workers re-admits none."""
        return set()

    def fresh_step(self) -> None:
        """The next step runs only requests that have run no step before, so none depends on what the workers'
        current processes computed: a transport that fails layers reaching a restarted worker (object refs) takes
        the workers' processes as they are from here."""
        return None

    def connect(self) -> None:
        """Set up before the first layer (the channel transport compiles its graph), so the first request does not
        pay for it. Never raises: what it could not set up is set up by the first request."""
        return None

    def close(self) -> None:
        """Release what the transport holds (compiled graphs, groups); the workers themselves stay up."""
        return None


class RemoteTransport(Transport):
    """Base of the transports to expert-worker actors, with the constructor every registry row is built with:
    the actors' handles (index = worker id), how long a layer may take before its worker counts as failed, and
    the micro-batch threshold. ``retry_unavailable``: a worker Ray reports unavailable is asked once more before
    the layer fails (set when the experts have no other copy to fail over to). ``echo`` (benchmarks): the workers
    send the rows back without computing."""

    def __init__(self, handles: Sequence[Any], *, timeout_s: float = 60.0, overlap_min_batch: int = 0) -> None:
        self.handles = list(handles)
        self.timeout_s = timeout_s
        self.overlap_min_batch = overlap_min_batch
        self.retry_unavailable = True
        self.echo = False
        self._init_transport()

    def _init_transport(self) -> None:
        """The transport's own state, set once the shared fields are (subclasses override it)."""
        return None


class Shard(Protocol):
    """What :class:`LocalTransport` needs of an expert shard (``workers.expert.ExpertShard``)."""

    def run(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class LocalTransport(Transport):
    """Every message served in this process by the shard of its worker id (W = 0: one shard holds all experts).
    :meth:`start` computes at once, so two micro-batches in flight gain nothing here."""

    def __init__(self, shards: Mapping[int, Shard]) -> None:
        self.shards = dict(shards)

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> Exchange:
        partials = []
        for m in messages:
            xs = x if m.has_every_token(x.shape[0]) else x[m.tokens]  # [N_w, D]
            partials.append(self.shards[m.worker].run(layer, xs, m.rows, m.experts, m.weights))
        return Done(partials)
