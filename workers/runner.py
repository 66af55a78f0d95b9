"""The executor of step batches: a :class:`~workers.model.MixtralModel` over a paged KV cache.

Implements ``cluster.engine.step.Executor``: the scheduler hands out KV blocks and sends
:class:`~cluster.engine.step.StepBatch` es; the runner lays each batch out for attention
(:func:`~workers.kv_cache.plan_step`) once, runs the model and returns the sampled rows' logits.
"""

from __future__ import annotations

import torch

from cluster.engine.step import StepBatch
from workers.kv_cache import KVCache, plan_step
from workers.model import MixtralModel


class ModelRunner:
    """Runs step batches over ``num_blocks`` KV blocks of ``block_size`` positions."""

    def __init__(self, model: MixtralModel, *, num_blocks: int, block_size: int) -> None:
        cfg = model.config
        self.model = model
        self.kv = KVCache(
            num_layers=cfg.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def execute(self, batch: StepBatch) -> torch.Tensor:
        if batch.first_step:  # no request in flight has used a worker yet: restarted ones are taken as they are
            self.model.experts.fresh_step()
        plan = plan_step(
            batch.chunks,
            block_size=self.kv.block_size,
            window=self.model.config.sliding_window,
            device=self.model.device,
        )
        return self.model(batch.token_ids, plan, self.kv, batch.logit_rows)
