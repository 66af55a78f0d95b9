"""Top-k routing in float32, and per-layer, per-expert counters of routed tokens.

Shapes: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    """ids [T, K] int64 chosen experts; weights [T, K] float32, each row summing to 1."""

    ids: torch.Tensor
    weights: torch.Tensor


def route(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> Routing:
    """Mixtral routing: softmax over all E logits in float32, keep the top k, renormalise them to sum to 1.

    hidden [T, D], gate_weight [E, D]. Example with E=4, k=2: probabilities (0.1, 0.4, 0.3, 0.2) choose
    experts (1, 2) with weights (0.4/0.7, 0.3/0.7).
    """
    logits = F.linear(hidden, gate_weight)  # [T, E] in the model dtype, as transformers computes it
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids=ids, weights=weights)


class ExpertLoad:
    """Counts of tokens routed to each (layer, expert) since start; thread-safe. Counted on the routing ids' own
    device (on a GPU: no copy to the host, so no wait for the GPU, at every layer), read back by :meth:`snapshot`."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self._counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)  # [L, E], moved to the ids' device
        self._lock = threading.Lock()

    def add(self, layer: int, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=self._counts.shape[1])  # [E]
        with self._lock:
            if self._counts.device != ids.device:
                self._counts = self._counts.to(ids.device)
            self._counts[layer] += counts

    def snapshot(self) -> list[list[int]]:
        """[layer][expert] -> tokens routed so far."""
        with self._lock:
            return self._counts.tolist()
