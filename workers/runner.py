"""The executor of step batches: a :class:`~workers.model.MixtralModel` over a slot-based KV cache.

Implements ``cluster.step.Executor``: the scheduler hands out KV slots and sends :class:`~cluster.step.StepBatch`
es; the runner lays each batch out for attention (:func:`~workers.kv_cache.plan_step`) once, runs the model and
returns the sampled rows' logits.
"""

from __future__ import annotations

import torch

from cluster.step import StepBatch
from workers.kv_cache import KVCache, plan_step
from workers.model import MixtralModel

# Decode batches whose sequences x cached positions reach this attend on their cache slots in place (one small
# attention call per sequence) instead of gathering every slot into a padded batch (a copy of the whole context
# per layer). Measured on the bench model: at batch 32 and ~260 cached positions the gather+cat was ~30% of a step.
DECODE_VIEW_THRESHOLD = 2048


class ModelRunner:
    """Runs step batches; ``num_slots`` slots of ``max_model_len`` positions (``sliding_window`` when smaller)."""

    def __init__(self, model: MixtralModel, *, num_slots: int, max_model_len: int) -> None:
        cfg = model.config
        self.model = model
        self.window = cfg.sliding_window
        capacity = min(max_model_len, self.window) if self.window else max_model_len
        self.kv = KVCache(
            num_layers=cfg.num_layers,
            num_slots=num_slots,
            capacity=capacity,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=model.dtype,
            device=model.device,
        )

    @property
    def num_slots(self) -> int:
        return self.kv.num_slots

    def execute(self, batch: StepBatch) -> torch.Tensor:
        attention = self.model.attention
        plan = plan_step(
            batch.chunks,
            capacity=self.kv.capacity,
            window=self.window,
            device=self.model.device,
            need_key_order=attention.backend == "flash_attention_2",
            view_threshold=DECODE_VIEW_THRESHOLD if attention.attends_in_place else None,
        )
        return self.model(batch.token_ids, plan, self.kv, batch.logit_rows)
