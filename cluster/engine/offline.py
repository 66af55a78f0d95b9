"""What the offline API and the benchmarks run on an idle engine core, between or instead of serving steps: a batch
of prompts to completion (:func:`generate`) and full-sequence logits (:func:`logits`); ``EngineCore.generate`` and
``EngineCore.logits`` call these."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from cluster.config.engine import EngineConfig
from cluster.engine.request import Params, RequestOutput
from cluster.engine.scheduler import Scheduler
from cluster.engine.step import Executor, SeqChunk, StepBatch
from cluster.errors import EngineOverloadedError, InvalidRequestError, PromptTooLongError


class Core(Protocol):
    """What these calls use of ``cluster.engine.core.EngineCore``."""

    config: EngineConfig
    scheduler: Scheduler
    executor: Executor
    max_model_len: int

    def validate(self, prompt_token_ids: list[int], params: Params) -> None: ...
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Params) -> None: ...
    def step(self) -> list[RequestOutput]: ...


def generate(
    core: Core,
    prompts: Sequence[list[int]],
    params: Sequence[Params],
    on_finished: Callable[[int, RequestOutput], None] | None = None,
) -> list[RequestOutput]:
    """Run the prompts until all finish; outputs in prompt order; ``on_finished(i, output)`` as prompt i finishes.

    Every prompt is validated first (a bad one fails the call before anything runs); prompts are then fed to
    the scheduler as its queue has room, so any number of prompts can be given at once.
    """
    for p, sp in zip(prompts, params, strict=True):
        core.validate(p, sp)
    ids = [f"offline-{uuid.uuid4().hex}" for _ in prompts]
    index = {rid: i for i, rid in enumerate(ids)}
    pending = list(zip(ids, prompts, params, strict=True))
    pending.reverse()
    final: dict[str, RequestOutput] = {}
    while len(final) < len(ids):
        while pending:
            rid, p, sp = pending[-1]
            try:
                core.add_request(rid, p, sp)
            except EngineOverloadedError:
                break
            pending.pop()
        for out in core.step():
            if out.finished:
                final[out.request_id] = out
                if on_finished is not None:
                    on_finished(index[out.request_id], out)
    return [final[r] for r in ids]


def logits(core: Core, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence float32 logits [len, V], prefilled in chunks in blocks of its own. Call only when idle."""
    if not token_ids:
        raise InvalidRequestError("token_ids is empty", param="token_ids")
    if len(token_ids) > core.max_model_len:
        raise PromptTooLongError(
            f"{len(token_ids)} tokens exceed this model's maximum context length of {core.max_model_len}",
            param="token_ids",
        )
    sched = core.scheduler
    need = -(-len(token_ids) // sched.block_size)
    if need > sched.pool.num_free:
        raise EngineOverloadedError("not enough free KV-cache blocks for a logits request")
    blocks = tuple(sched.pool.allocate() for _ in range(need))  # private: never registered for reuse
    try:
        parts = []
        step = core.config.max_num_batched_tokens
        for start in range(0, len(token_ids), step):
            piece = token_ids[start : start + step]
            end = -(-(start + len(piece)) // sched.block_size)
            batch = StepBatch(
                token_ids=torch.tensor(piece, dtype=torch.int64),
                chunks=(SeqChunk(start=start, n=len(piece), blocks=blocks[:end]),),
                logit_rows=torch.arange(len(piece)),
                first_step=start == 0,  # an idle engine: this private sequence is all there is
            )
            parts.append(core.executor.execute(batch).logits)
        return torch.cat(parts)
    finally:
        for b in blocks:
            sched.pool.release(b)
