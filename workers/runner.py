"""The executor of step batches: a :class:`~workers.model.MixtralModel` over a paged KV cache.

Implements ``cluster.engine.step.Executor``: the scheduler hands out KV blocks and sends
:class:`~cluster.engine.step.StepBatch` es; the runner lays each batch out for attention
(:func:`~workers.kv_cache.plan_step`) once, runs the model and returns the rows asked for
(:class:`~cluster.engine.step.StepOutput`).

Beside the KV cache, every position of every block records the experts its token was routed to ([N, S, L, K]: N
blocks of S positions, L layers, K experts per token; int16, 2 L K bytes a position, against 4 L Hkv Dh bytes of
bf16 keys and values). A block found in the prefix cache thus still tells which experts its tokens took.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cluster.engine.step import StepBatch, StepOutput
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
        # [N, S, L, K] the experts each cached position was routed to
        self.routed = torch.zeros(
            num_blocks, block_size, cfg.num_layers, cfg.top_k, dtype=torch.int16, device=model.device
        )

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def execute(self, batch: StepBatch) -> StepOutput:
        if batch.first_step:  # no request in flight has used a worker yet: restarted ones are taken as they are
            self.model.experts.fresh_step()
        plan = plan_step(
            batch.chunks,
            block_size=self.kv.block_size,
            window=self.model.config.sliding_window,
            device=self.model.device,
        )
        out = self.model(batch.token_ids, plan, self.kv, batch.logit_rows, batch.hidden_rows)
        assert out.routed is not None
        self.routed[plan.write_block, plan.write_offset] = out.routed
        return out

    def routed_experts(self, blocks: Sequence[int]) -> torch.Tensor:
        """[len(blocks) * S, L, K] on the CPU: what the positions of these blocks were routed to."""
        idx = torch.tensor(list(blocks), dtype=torch.int64, device=self.routed.device)
        return self.routed[idx].flatten(0, 1).cpu()
