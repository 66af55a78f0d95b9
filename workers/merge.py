"""Batching across frontends in an expert worker: the layer messages of several frontends that are waiting together
run as ONE grouped expert matmul, and each frontend gets its own rows back (:class:`LayerMerger`).

No lockstep. Messages queue while the worker computes; when it is free it takes the oldest waiting message's layer
and every message of that layer waiting with it (so a busy frontend cannot starve another: the oldest message always
goes next), runs them together, and answers each. Left alone, frontends fall into turns (one's attention while the
other's experts run) and their layers rarely meet, so the worker opens a short gather window: when another frontend
is one layer behind (its previous layer, or for layer 0 its previous step's last, was answered and its usual gap,
reply to next message, has not passed), the run waits for it: until 1.5 of that frontend's gaps after its reply, at
most one gap of the waiting frontend's own (its attention pass) and at least two runs' time (2 ms). Once two
frontends' layers meet, their replies come together and they stay in step. A frontend with no work sends nothing and
is never waited for; one that dies mid-layer leaves nothing behind but a reply nobody reads (and is waited for at
most once more).

Example: frontends A and B both wait on layer 3 with 2 and 5 rows, and A on layer 4 (sent after): one run of layer 3
over 7 rows (A's rows first), then layer 4. Shapes: N_i rows of message i, A_i its (row, expert) assignments, D hidden.
"""

from __future__ import annotations

import collections
import threading
import time
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
    sender: str | None = None  # the frontend (its transport) that sent it; None: unknown, never waited for
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
    waits: int = 0  # runs that waited for a frontend expected to send the same layer (gather window)
    waited_s: float = 0.0  # seconds spent so
    wait_hits: int = 0  # waits that the expected message joined
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


@dataclass
class _Sender:
    """What the merger knows of one frontend: the last layer it sent, when, and when that was answered; ``gap_s``:
    how long it takes from a reply to its next layer's message within a step (its attention), smoothed."""

    layer: int = -1
    sent_at: float = 0.0
    replied_at: float = 0.0
    gap_s: float | None = None
    step_gap_s: float | None = None  # from the reply to its step's last layer to its next step's layer 0

    def next_of(self, layer: int) -> bool:
        """Whether ``layer`` is the one this frontend sends after its last: the next layer of the step, or layer 0
        of a new step."""
        return layer == self.layer + 1 or (layer == 0 and self.layer > 0)

    def gap_before(self, layer: int) -> float | None:
        return self.step_gap_s if layer == 0 else self.gap_s


GAP_SMOOTHING = 0.2  # weight of a new gap sample
WINDOW_GAPS = 1.5  # a frontend is expected within this many of its gaps after its last reply
STALE_SENDER_S = 30.0  # a frontend not heard of for this long is forgotten (detached or dead)


class LayerMerger:
    """Runs ``run`` on one thread of its own over the messages :meth:`submit` queues, merging those of the same
    layer that wait together. ``submit`` may be called from any thread; it blocks until the rows are computed."""

    def __init__(self, run: Run, *, window: bool = True, min_window_s: float = 0.002) -> None:
        self._run = run
        self._window, self._min_window_s = window, min_window_s
        self._senders: dict[str, _Sender] = {}
        self._run_s: float | None = None  # a run's seconds, smoothed: the most a gather window waits (at least 2 ms)
        self._queue: collections.deque[_Message] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = MergeStats()
        self._thread = threading.Thread(target=self._loop, name="expert-merger", daemon=True)
        self._thread.start()

    def submit(
        self,
        layer: int,
        x: torch.Tensor,
        rows: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        sender: str | None = None,
    ) -> torch.Tensor:
        """The message's output [N, D] (the experts' weighted sum per row), computed with whatever waits beside it.
        ``sender``: the frontend that sends it (the gather window learns its pace)."""
        m = _Message(layer, x, rows, experts, weights, sender)
        with self._cond:
            if self._closed:
                raise RuntimeError("the expert merger is closed")
            if sender is not None:
                self._sent(sender, layer)
            self._queue.append(m)
            self._cond.notify_all()
        return m.reply.result()

    def _sent(self, sender: str, layer: int) -> None:
        """Record a frontend's message (under the lock): its gap when it follows the reply to its previous layer."""
        now = time.monotonic()
        s = self._senders.setdefault(sender, _Sender())
        if s.next_of(layer) and s.replied_at >= s.sent_at > 0:
            gap, old = now - s.replied_at, s.gap_before(layer)
            smoothed = gap if old is None else (1 - GAP_SMOOTHING) * old + GAP_SMOOTHING * gap
            if layer == 0:
                s.step_gap_s = smoothed
            else:
                s.gap_s = smoothed
        s.layer, s.sent_at = layer, now
        for name in [n for n, o in self._senders.items() if now - o.sent_at > STALE_SENDER_S]:
            del self._senders[name]

    def _due(self, layer: int, batch: list[_Message], now: float) -> float | None:
        """When the last frontend expected to send ``layer`` soon should have sent it (None: none is): one whose
        previous layer (or, for layer 0, its previous step) was answered and whose usual gap has not passed (a
        frontend with no work, or a dead one, is not expected)."""
        present = {m.sender for m in batch}
        due = None
        for name, s in self._senders.items():
            gap = s.gap_before(layer)
            if name in present or gap is None or not s.next_of(layer) or s.replied_at < s.sent_at:
                continue
            expected = s.replied_at + WINDOW_GAPS * gap
            if expected > now:
                due = expected if due is None else max(due, expected)
        return due

    def _limit(self, layer: int, batch: list[_Message], start: float) -> float:
        """The longest a run of ``layer`` waits, from ``start``: the waiting frontends' own gap before this layer (so
        a frontend waits at most about one of its own attention passes), at least two runs' time and
        ``min_window_s``. A window, never lockstep."""
        present = {m.sender for m in batch}
        own = max((s.gap_before(layer) or 0.0 for n, s in self._senders.items() if n in present), default=0.0)
        return start + max(2 * (self._run_s or 0.0), self._min_window_s, own)

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
            if self._window:
                self._gather(layer)
            batch = [m for m in self._queue if m.layer == layer]
            self._queue = collections.deque(m for m in self._queue if m.layer != layer)
            return batch

    def _gather(self, layer: int) -> None:
        """Wait (under the lock) while a frontend expected to send ``layer`` has not yet, up to :meth:`_due`."""
        start = time.monotonic()
        batch = [m for m in self._queue if m.layer == layer]
        if self._due(layer, batch, start) is None:
            return
        limit = self._limit(layer, batch, start)
        self.stats.waits += 1
        while not self._closed:
            now = time.monotonic()
            due = self._due(layer, [m for m in self._queue if m.layer == layer], now)
            if due is None or now >= min(due, limit):
                break
            self._cond.wait(min(due, limit) - now)
        self.stats.waited_s += time.monotonic() - start
        self.stats.wait_hits += len({m.sender for m in self._queue if m.layer == layer}) > 1

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            t0 = time.monotonic()
            try:
                outs = self._merged(batch)
            except BaseException as e:  # every waiting frontend gets the error (a bug in the expert code)
                for m in batch:
                    m.reply.set_exception(e)
                continue
            self._answered(batch, time.monotonic() - t0)
            for m, out in zip(batch, outs, strict=True):
                m.reply.set_result(out)

    def _answered(self, batch: list[_Message], run_s: float) -> None:
        with self._cond:
            now = time.monotonic()
            self._run_s = run_s if self._run_s is None else (1 - GAP_SMOOTHING) * self._run_s + GAP_SMOOTHING * run_s
            for m in batch:
                if m.sender is not None and (s := self._senders.get(m.sender)) is not None and s.layer == m.layer:
                    s.replied_at = now

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
