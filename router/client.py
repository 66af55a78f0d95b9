"""The one interface between the frontend's MoE blocks and the experts: :class:`ExpertClient`.

A client turns one layer's routing into one message per worker (:func:`router.dispatch.plan`), moves the messages
to the workers and their partial outputs back (:meth:`ExpertClient.start`, the only part a transport implements),
and sums the partials into the layer's output (:func:`router.dispatch.combine`).

Two ways to call it: :meth:`ExpertClient.forward` (blocking) or :meth:`ExpertClient.submit`, which returns as soon
as the messages are on their way; :meth:`Pending.result` waits for the partials and combines them. The model uses
``submit`` to keep two micro-batches in flight (the frontend computes one while the workers run the other).

Redundant experts (``placement.replicas`` R > 1): :meth:`ExpertClient.plan` sends each expert's rows to one live
copy, balancing routed tokens across copies (:func:`router.dispatch.choose_replicas`); when a worker fails a layer,
:meth:`Pending.result` marks it down and sends the whole layer again to the remaining copies, within the same step.
A transport re-admits a down worker once it answers again (:meth:`ExpertClient.refresh`). With R = 1 every expert
has one worker and a failure fails the step.

Transports: :class:`LocalExperts` here (in-process, no Ray: W = 0, the reference path); ``router.object_ref``
(Ray actor calls), ``router.channel`` (Ray Compiled Graph channels) and ``router.rdt`` (Ray Direct Transport).

Shapes: T tokens, D hidden, K experts per token, N_w distinct tokens sent to worker w.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from cluster.errors import ExpertWorkerError
from cluster.placement import ExpertPlacement
from router import dispatch
from router.dispatch import WorkerMessage
from router.gate import Routing

log = logging.getLogger("mixserve")

TRANSPORTS = ("object_ref", "channel", "gloo", "nccl")


class Exchange(Protocol):
    """A layer's messages on their way: :meth:`wait` returns one [N_w, D] partial per message, in order."""

    def wait(self) -> list[torch.Tensor]: ...


class Done:
    """An exchange that has already finished (in-process experts)."""

    def __init__(self, partials: list[torch.Tensor]) -> None:
        self.partials = partials

    def wait(self) -> list[torch.Tensor]:
        return self.partials


class Pending:
    """One layer's expert output in flight: :meth:`result` waits and returns the combined output [T, D]."""

    def __init__(
        self, *, client: ExpertClient, layer: int, x: torch.Tensor, routing: Routing, messages: list[WorkerMessage]
    ) -> None:
        self.client, self.layer, self.x, self.routing = client, layer, x, routing
        self.messages = messages
        self.exchange = client.start(layer, x, messages)

    def result(self) -> torch.Tensor:
        """The combined output; a worker that fails the layer is failed over to the other copies of its experts
        (at most once per worker), else its :class:`ExpertWorkerError` propagates."""
        t0 = time.perf_counter()
        try:
            for _ in range(self.client.placement.num_workers):
                try:
                    partials = self.exchange.wait()
                    break
                except ExpertWorkerError as e:
                    if not self.client.fail_over(e):
                        raise
                    self.messages = self.client.plan(self.layer, self.routing)
                    self.exchange = self.client.start(self.layer, self.x, self.messages)
            else:
                partials = self.exchange.wait()
        finally:
            self.client.waited_s += time.perf_counter() - t0
        return dispatch.combine(self.messages, partials, like=self.x)

    def discard(self) -> None:
        """Wait for the exchange and drop what comes back (a step that fails must not leave replies unread)."""
        with contextlib.suppress(Exception):
            self.exchange.wait()


class ExpertClient(ABC):
    """Dispatch a layer's rows to the workers that hold their experts and combine what comes back.

    ``overlap_min_batch``: steps of at least this many tokens are run as two micro-batches in flight by the model
    (``workers.model``); 0 turns it off. Only transports whose :meth:`start` returns before the workers finish
    gain from it, so the in-process client keeps 0.
    """

    overlap_min_batch: int = 0

    def __init__(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        self.waited_s = 0.0  # seconds spent in Pending.result waiting for replies (benchmarks read it)
        # [E] int64 per layer: the (primary) worker of each expert
        self._worker_of_expert = [placement.worker_tensor(i) for i in range(placement.num_layers)]
        # [L][E]: the workers holding each expert (primary first)
        self._holders = [
            [placement.holders(layer, e) for e in range(placement.num_experts)] for layer in range(placement.num_layers)
        ]
        self.down: set[int] = set()  # workers failed over and not answering again yet (replicas > 1 only)
        self.failovers = 0  # layers sent again to other copies after a worker failed them

    def plan(self, layer: int, routing: Routing) -> list[WorkerMessage]:
        """routing.ids/weights [T, K] -> one message per worker that has rows.

        R = 1: each expert's one worker. R > 1: a live copy per expert, balanced by routed tokens; an expert with
        rows and no live copy is an :class:`ExpertWorkerError`."""
        if self.placement.num_workers == 1:
            return dispatch.plan_one_worker(routing)
        if self.placement.replicas == 1:
            where = self._worker_of_expert[layer]
            if where.device != routing.ids.device:
                where = self._worker_of_expert[layer] = where.to(routing.ids.device)
            return dispatch.plan(routing, where)
        if self.down:
            self.refresh()
        live = set(range(self.placement.num_workers)) - self.down
        counts = torch.bincount(routing.ids.reshape(-1), minlength=self.placement.num_experts).tolist()  # [E]
        chosen = dispatch.choose_replicas(counts, self._holders[layer], live)  # [E]
        orphans = [e for e, w in enumerate(chosen) if w < 0 and counts[e] > 0]
        if orphans:
            raise ExpertWorkerError(
                f"layer {layer} experts {orphans} have no live copy: expert workers {sorted(self.down)} are down"
            )
        where = torch.tensor([max(w, 0) for w in chosen], dtype=torch.int64, device=routing.ids.device)
        return dispatch.plan(routing, where)

    def fail_over(self, error: ExpertWorkerError) -> bool:
        """Take the failed worker out of routing when its experts have other copies; False when they do not (R = 1,
        or the error names no worker), and the step fails. A layer sent before the worker was taken out (the other
        micro-batch in flight) fails over the same way."""
        w = error.worker
        if self.placement.replicas == 1 or w is None:
            return False
        self.failovers += 1
        if w in self.down:
            return True
        self.down.add(w)
        log.warning("expert worker %d failed (%s); other copies of its experts take over until it answers", w, error)
        return True

    def refresh(self) -> None:
        """Re-admit down workers that answer again (transports that can probe their workers override this)."""
        return None

    def submit(self, layer: int, x: torch.Tensor, routing: Routing) -> Pending:
        """x [T, D] normalised hidden states, routing.ids/weights [T, K] -> the layer's output in flight."""
        return Pending(client=self, layer=layer, x=x, routing=routing, messages=self.plan(layer, routing))

    def forward(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, D] normalised hidden states, routing.ids/weights [T, K] -> weighted expert output [T, D]."""
        return self.submit(layer, x, routing).result()

    def exchange(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        """Send each message's rows of x [T, D] to its worker; one [N_w, D] partial per message, in order."""
        return self.start(layer, x, messages).wait()

    @abstractmethod
    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> Exchange:
        """Put each message's rows of x [T, D] on its way to its worker; return without waiting for the replies."""

    def connect(self) -> None:
        """Set the transport up before the first layer (the channel transport compiles its graph), so the first
        request does not pay for it. The builder calls it once the model is loaded; it never raises (what it could
        not set up is set up by the first request)."""
        return None

    def close(self) -> None:
        """Release what the transport holds (compiled graphs, groups); the workers themselves stay up."""
        return None


class RemoteExperts(ExpertClient):
    """Base of the transports to expert-worker actors: their handles (index = worker id), how long a layer may
    take before the worker counts as failed, the micro-batch threshold, and ``echo`` (benchmarks: the workers send
    the rows back without computing)."""

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
        self.echo = False
        self._init_transport()

    def _init_transport(self) -> None:
        """The transport's own state, set once the shared fields are (subclasses override it)."""
        return None


class Shard(Protocol):
    """What :class:`LocalExperts` needs of an expert shard (``workers.expert.ExpertShard``)."""

    def run(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class LocalExperts(ExpertClient):
    """Every message served in this process by the shard of its worker id (W = 0: one shard holds all experts).
    :meth:`start` computes at once, so two micro-batches in flight gain nothing here."""

    def __init__(self, placement: ExpertPlacement, shards: Mapping[int, Shard]) -> None:
        super().__init__(placement)
        self.shards = dict(shards)

    def start(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> Exchange:
        partials = []
        for m in messages:
            xs = x if m.has_every_token(x.shape[0]) else x[m.tokens]  # [N_w, D]
            partials.append(self.shards[m.worker].run(layer, xs, m.rows, m.experts, m.weights))
        return Done(partials)
