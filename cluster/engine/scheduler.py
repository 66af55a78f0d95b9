"""Iteration-level scheduling: which requests run in the next step, with which tokens, in which KV-cache slots.

The scheduler owns the slots (:class:`SlotPool`): a request gets one when it is admitted and gives it back when it
finishes, is aborted or fails. Each step decodes one token for every running request, then continues unfinished
prefills (oldest first), then admits waiting requests, all within ``max_num_batched_tokens`` (long prompts are
prefilled in chunks) and the free slots. Thread-safe intake: ``add`` and ``abort`` may be called from any thread;
everything else runs on the engine's thread.
"""

from __future__ import annotations

import collections
import threading

from cluster.engine.config import EngineConfig
from cluster.engine.request import Request
from cluster.errors import EngineOverloadedError, InvalidRequestError
from cluster.step import SeqChunk


class SlotPool:
    """Free KV-cache slot ids; lowest first."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise RuntimeError(f"KV-cache slot {slot} released twice or unknown")
        self._free.append(slot)


class Scheduler:
    def __init__(self, config: EngineConfig, num_slots: int) -> None:
        self.config = config
        self.slots = SlotPool(num_slots)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self.rejected_overload = 0

    # ------------------------------------------------------------------ intake (any thread)
    def add(self, req: Request) -> None:
        with self._lock:
            if req.request_id in self._by_id:
                raise InvalidRequestError(f"request id {req.request_id!r} is already in use", param="request_id")
            # Requests that a free slot will take at the next step are not waiting for a slot: only the rest count.
            queued = len(self.waiting) - self.slots.free
            if queued >= self.config.max_queued_requests:
                self.rejected_overload += 1
                raise EngineOverloadedError(
                    f"the server is overloaded: {queued} requests are already waiting for a slot; retry later"
                )
            self.waiting.append(req)
            self._by_id[req.request_id] = req

    def abort(self, request_id: str) -> None:
        """Mark a request to stop; :meth:`take_aborted` removes it before the next step."""
        with self._lock:
            if request_id in self._by_id:
                self._aborts.append(request_id)

    # ------------------------------------------------------------------ state
    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._aborts)

    # ------------------------------------------------------------------ the engine's thread
    def take_aborted(self) -> list[Request]:
        """Requests aborted since the last call, out of every queue with their slots freed."""
        with self._lock:
            ids, self._aborts = self._aborts, []
            reqs = [r for r in (self._by_id.get(i) for i in dict.fromkeys(ids)) if r is not None]  # once each
            for req in reqs:
                if req in self.waiting:
                    self.waiting.remove(req)
        for req in reqs:
            self.finish(req)
        return reqs

    def schedule(self) -> list[tuple[Request, SeqChunk]]:
        """The next step's requests and their chunks: decodes, then continued prefills, then admissions."""
        budget = self.config.max_num_batched_tokens
        step: list[tuple[Request, SeqChunk]] = []
        for req in self.running:  # decodes first: one token each
            if not req.prefilling:
                step.append((req, SeqChunk(slot=_slot(req), start=req.computed, n=1)))
                budget -= 1
        for req in self.running:  # then unfinished prefills, oldest first
            if req.prefilling and budget > 0:
                n = min(len(req.prompt) - req.computed, budget)
                step.append((req, SeqChunk(slot=_slot(req), start=req.computed, n=n)))
                budget -= n
        while budget > 0 and self.slots.free > 0:
            with self._lock:  # pop and allocate together, so add()'s free-slot count stays consistent
                if not self.waiting:
                    break
                req = self.waiting.popleft()
                req.slot = self.slots.allocate()
            self.running.append(req)
            n = min(len(req.prompt), budget)
            step.append((req, SeqChunk(slot=req.slot, start=0, n=n)))
            budget -= n
        return step

    def finish(self, req: Request) -> None:
        """The request leaves: out of the running batch, its slot freed, its id free for reuse."""
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.slots.release(req.slot)
            req.slot = None
        with self._lock:
            self._by_id.pop(req.request_id, None)


def _slot(req: Request) -> int:
    assert req.slot is not None, "a running request holds a slot"
    return req.slot
