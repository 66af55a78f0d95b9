"""Batching across frontends in an expert worker: the layer messages of several frontends that are waiting together
run as ONE grouped expert matmul, and each frontend gets its own rows back (:class:`LayerMerger`).

No lockstep: the worker never waits for a frontend. Messages queue while the worker computes; when it is free it
takes the oldest waiting message's layer and every message of that layer waiting with it (so a busy frontend cannot
starve another: the oldest message always goes next), runs them together, and answers each. A frontend with no work
sends nothing; one that dies mid-layer leaves nothing behind but a reply nobody reads.

Example: frontends A and B both wait on layer 3 with 2 and 5 rows, and A on layer 4 (sent after): one run of layer 3
over 7 rows (A's rows first), then layer 4. Shapes: N_i rows of message i, A_i its (row, expert) assignments, D hidden.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

# run(layer, x [N, D], rows [A], experts [A] (sorted ascending), weights [A]) -> [N, D]
Run = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Message:
    layer: int
    x: torch.Tensor  # [N_i, D]
    rows: torch.Tensor  # [A_i] into x
    experts: torch.Tensor  # [A_i]
    weights: torch.Tensor  # [A_i]
    reply: Future = field(default_factory=Future)


# Upper bounds of the rows-per-run histogram (assignments A of one run); the last bucket is +inf
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass
class MergeStats:
    """Counts of what the merger ran: ``runs`` grouped runs, ``messages`` answered, ``rows`` [A] assignments, and
    ``expert_calls`` (distinct experts per run, summed): rows per expert matmul = rows / expert_calls.
    ``rows_per_run``: how many runs had at most ``ROWS_BUCKETS[i]`` rows (not cumulative; the last: more)."""

    runs: int = 0
    messages: int = 0
    rows: int = 0
    expert_calls: int = 0
    merged_runs: int = 0  # runs that served more than one message
    rows_per_run: list[int] = field(default_factory=lambda: [0] * (len(ROWS_BUCKETS) + 1))

    def count(self, *, messages: int, rows: int, experts: int) -> None:
        self.runs += 1
        self.messages += messages
        self.merged_runs += messages > 1
        self.rows += rows
        self.expert_calls += experts
        self.rows_per_run[next((i for i, b in enumerate(ROWS_BUCKETS) if rows <= b), len(ROWS_BUCKETS))] += 1

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "rows_per_run": list(self.rows_per_run), "rows_buckets": list(ROWS_BUCKETS)}


class LayerMerger:
    """Runs ``run`` on one thread of its own over the messages :meth:`submit` queues, merging those of the same
    layer that wait together. ``submit`` may be called from any thread; it blocks until the rows are computed."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._queue: collections.deque[_Message] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = MergeStats()
        self._thread = threading.Thread(target=self._loop, name="expert-merger", daemon=True)
        self._thread.start()

    def submit(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The message's output [N, D] (the experts' weighted sum per row), computed with whatever waits beside it."""
        m = _Message(layer, x, rows, experts, weights)
        with self._cond:
            if self._closed:
                raise RuntimeError("the expert merger is closed")
            self._queue.append(m)
            self._cond.notify()
        return m.reply.result()

    def waiting(self) -> int:
        """Messages queued and not yet taken by a run."""
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[_Message] | None:
        """The oldest waiting message's layer: every waiting message of it, oldest first; None once closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            layer = self._queue[0].layer
            batch = [m for m in self._queue if m.layer == layer]
            self._queue = collections.deque(m for m in self._queue if m.layer != layer)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                outs = self._merged(batch)
            except BaseException as e:  # every waiting frontend gets the error (a bug in the expert code)
                for m in batch:
                    m.reply.set_exception(e)
                continue
            for m, out in zip(batch, outs, strict=True):
                m.reply.set_result(out)

    def _merged(self, batch: list[_Message]) -> list[torch.Tensor]:
        """One run over every message of ``batch`` (same layer); each message's rows of the output."""
        if len(batch) == 1:
            m = batch[0]
            experts = int(torch.unique_consecutive(m.experts).numel())
            self.stats.count(messages=1, rows=m.rows.numel(), experts=experts)
            return [self._run(m.layer, m.x, m.rows, m.experts, m.weights)]
        sizes = [m.x.shape[0] for m in batch]
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)  # [messages]: first row of each
        x = torch.cat([m.x for m in batch])  # [sum N_i, D]
        rows = torch.cat([m.rows + off for m, off in zip(batch, offsets.tolist(), strict=True)])  # [sum A_i]
        experts = torch.cat([m.experts for m in batch])
        weights = torch.cat([m.weights for m in batch])
        order = torch.argsort(experts, stable=True)  # the run takes its assignments grouped by expert
        rows, experts, weights = rows[order], experts[order], weights[order]
        distinct = int(torch.unique_consecutive(experts).numel())
        self.stats.count(messages=len(batch), rows=rows.numel(), experts=distinct)
        out = self._run(batch[0].layer, x, rows, experts, weights)  # [sum N_i, D]
        return list(out.split(sizes))
