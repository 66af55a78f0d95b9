"""How a layer's messages reach the experts and how the partial outputs come back.

The frontend only sees :class:`ExpertClient`: ``run_layer(layer, x, messages) -> partials``. Implementations:

- :class:`LocalExperts`: in-process, no Ray (W = 0; the reference path).
- ``RayExperts`` (``router.ray_transport``): one actor call per worker with rows, issued concurrently, over
  ordinary object refs or Ray Direct Transport.
"""

from __future__ import annotations

from typing import Protocol

import torch

from router.dispatch import WorkerMessage
from workers.expert import ExpertShard


class ExpertClient(Protocol):
    def run_layer(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        """x [T, D] the normalised hidden states; returns one [N_w, D] partial per message, in order."""
        ...


class LocalExperts:
    """All messages served in-process by shards indexed by worker id."""

    def __init__(self, shards: dict[int, ExpertShard]) -> None:
        self.shards = shards

    def run_layer(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        return [self.shards[m.worker].run(layer, x[m.tokens], m.rows, m.experts, m.weights) for m in messages]
