"""The one interface between the frontend's MoE blocks and the experts: :class:`ExpertClient`.

A client turns one layer's routing into one message per worker (:func:`router.dispatch.plan`), moves the messages
to the workers and their partial outputs back (:meth:`ExpertClient.exchange`, the only part a transport
implements), and sums the partials into the layer's output (:func:`router.dispatch.combine`).

Transports: :class:`LocalExperts` here (in-process, no Ray: W = 0, the reference path); ``router.object_ref``
(Ray actor calls) and ``router.rdt`` (Ray Direct Transport).

Shapes: T tokens, D hidden, K experts per token, N_w distinct tokens sent to worker w.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol

import torch

from cluster.placement import ExpertPlacement
from router import dispatch
from router.dispatch import WorkerMessage
from router.gate import Routing

TRANSPORTS = ("object_ref", "gloo", "nccl")


class ExpertClient(ABC):
    """Dispatch a layer's rows to the workers that hold their experts and combine what comes back."""

    def __init__(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        # [E] int64 per layer: the worker of each expert
        self._worker_of_expert = [placement.worker_tensor(i) for i in range(placement.num_layers)]

    def forward(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, D] normalised hidden states, routing.ids/weights [T, K] -> weighted expert output [T, D]."""
        where = self._worker_of_expert[layer]
        if where.device != routing.ids.device:
            where = self._worker_of_expert[layer] = where.to(routing.ids.device)
        messages = dispatch.plan(routing, where)
        partials = self.exchange(layer, x, messages)
        return dispatch.combine(messages, partials, like=x)

    @abstractmethod
    def exchange(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        """Send each message's rows of x [T, D] to its worker; one [N_w, D] partial per message, in order."""


class Shard(Protocol):
    """What :class:`LocalExperts` needs of an expert shard (``workers.expert.ExpertShard``)."""

    def run(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class LocalExperts(ExpertClient):
    """Every message served in this process by the shard of its worker id (W = 0: one shard holds all experts)."""

    def __init__(self, placement: ExpertPlacement, shards: Mapping[int, Shard]) -> None:
        super().__init__(placement)
        self.shards = dict(shards)

    def exchange(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        return [self.shards[m.worker].run(layer, x[m.tokens], m.rows, m.experts, m.weights) for m in messages]
