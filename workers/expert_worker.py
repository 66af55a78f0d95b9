"""The expert-worker Ray actor: one worker's experts of every layer, loaded by the worker itself.

Wrapped with ``ray.remote`` by :mod:`cluster.cluster`. The constructor takes the checkpoint path and the worker's
share, never weights, so Ray can restart a dead worker and it reloads exactly its experts.
"""

from __future__ import annotations

import os

import ray
import torch

from cluster.config import ModelConfig
from workers.expert import ExpertShard


class ExpertWorker:
    """Serves :meth:`run` (one layer's message) for the experts it holds; ``echo`` is the dispatch benchmark's
    floor (same payload in and out, no compute)."""

    def __init__(
        self,
        *,
        model: str,
        worker: int,
        experts: list[tuple[int, int]],
        dtype: str = "float32",
        progress: bool = False,
    ) -> None:
        ctx = ray.get_runtime_context()
        self.worker = worker
        self.gpu_ids = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        self.device = "cuda" if self.gpu_ids and torch.cuda.is_available() else "cpu"
        self.node_id = ctx.get_node_id()
        self.pid = os.getpid()
        config = ModelConfig.from_dir(model)
        self.shard = ExpertShard.load(
            model, config, experts, dtype=dtype, device=self.device, progress=progress, label=f"worker {worker}"
        )

    def run(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """One layer's message: x [N, D] -> weighted expert outputs [N, D] (see :meth:`ExpertShard.run`)."""
        d = self.device
        return self.shard.run(layer, x.to(d), rows.to(d), experts.to(d), weights.to(d))

    def echo(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Same payload in and out as :meth:`run`, no compute."""
        return x

    def info(self) -> dict:
        return {
            "worker": self.worker,
            "experts": self.shard.experts,
            "node_id": self.node_id,
            "gpu_ids": self.gpu_ids,
            "device": self.device,
            "expert_bytes": self.shard.nbytes(),
            "pid": self.pid,
        }

    def ping(self) -> bool:
        return True
