"""Recording an engine's steps for the benchmarks: the model runner wrapped as the executor (:class:`Recorder`),
each step's tokens, sequences, forward time and the tokens it routed to each expert, and :func:`drive`, which runs a
batch of requests through ``EngineCore.generate`` and times the steps from one start to the next."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from cluster.bench import harness as h
from cluster.engine.sampling import SamplingParams
from cluster.engine.step import StepBatch, StepOutput
from cluster.runtime.frontend import Frontend


@dataclass
class Step:
    tokens: int
    seqs: int
    start: float
    forward_s: float
    routed: torch.Tensor  # [L, E] tokens routed to each (layer, expert) in this step
    step_s: float = 0.0  # from this step's start to the next one's (the last: to the end of generate)

    @property
    def decode(self) -> bool:
        return self.tokens == self.seqs


class Recorder:
    """The model runner as the engine's executor, recording every step; what runs is unchanged."""

    def __init__(self, fe: Frontend) -> None:
        self.runner, self.load = fe.runner, fe.model.expert_load
        self.steps: list[Step] = []

    def __getattr__(self, name: str) -> Any:  # the rest of the executor contract (KV-cache sizes) is the runner's
        return getattr(self.runner, name)

    def execute(self, batch: StepBatch) -> StepOutput:
        before = torch.tensor(self.load.snapshot())
        t0 = time.perf_counter()
        out = self.runner.execute(batch)
        h.sync()
        seconds = time.perf_counter() - t0
        routed = torch.tensor(self.load.snapshot()) - before
        self.steps.append(Step(batch.num_tokens, len(batch.chunks), t0, seconds, routed))
        return out


def drive(fe: Frontend, rec: Recorder, work: list[tuple[list[int], int]]) -> tuple[float, list[Step], list[list[int]]]:
    """``EngineCore.generate`` of every (prompt, max_tokens) at once: wall seconds, the steps and the output ids."""
    first = len(rec.steps)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in work]
    t0 = time.perf_counter()
    outs = fe.core.generate([p for p, _ in work], params)
    end = time.perf_counter()
    steps = rec.steps[first:]
    for s, nxt in zip(steps, [s.start for s in steps[1:]] + [end], strict=True):
        s.step_s = nxt - s.start
    return end - t0, steps, [o.token_ids for o in outs]
