"""Iteration-level scheduling over a paged KV cache: which requests run in the next step, with which tokens, in
which blocks.

The scheduler owns the cache's blocks (:class:`~cluster.engine.blocks.BlockPool`): a request takes blocks as its
tokens need them, shares full blocks with earlier requests that had the same prefix (prefix caching), gives back
blocks a sliding window has left, and returns everything when it finishes, is aborted, fails or is preempted.

Each step decodes one token for every running request, then continues unfinished prefills (oldest first), then
admits waiting requests, all within ``max_num_batched_tokens`` (long prompts are prefilled in chunks),
``max_num_seqs`` and the free blocks. When a running request needs a block and none is free, the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed (its
prefix is usually still cached) and continue where it was. Thread-safe intake: ``add`` and ``abort`` may be called
from any thread; everything else runs on the engine's thread.
"""

from __future__ import annotations

import collections
import threading
import time

from cluster.config.engine import EngineConfig
from cluster.engine.blocks import BlockPool, block_hashes
from cluster.engine.request import Request
from cluster.engine.step import FREED, SeqChunk
from cluster.errors import EngineOverloadedError, InvalidRequestError

DEFER = -1  # _admit: wait a step, the prefix is being computed


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, *, window: int | None) -> None:
        self.config = config
        self.pool = pool
        self.block_size = pool.block_size
        self.window = window
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self.rejected_overload = 0
        self.preemptions = 0

    # ------------------------------------------------------------------ intake (any thread)
    def add(self, req: Request) -> None:
        with self._lock:
            if req.request_id in self._by_id:
                raise InvalidRequestError(f"request id {req.request_id!r} is already in use", param="request_id")
            # Requests that a free batch place will take at the next step are not waiting: only the rest count.
            queued = len(self.waiting) - (self.config.max_num_seqs - len(self.running))
            if queued >= self.config.max_queued_requests:
                self.rejected_overload += 1
                raise EngineOverloadedError(
                    f"the server is overloaded: {queued} requests are already waiting to run; retry later"
                )
            self.waiting.append(req)
            self._by_id[req.request_id] = req

    def abort(self, request_id: str) -> None:
        """Mark a request to stop; :meth:`take_aborted` removes it before the next step."""
        with self._lock:
            if request_id in self._by_id:
                self._aborts.append(request_id)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` holds at its peak (a sliding window bounds it)."""
        bs = self.block_size
        if self.window is None:
            return -(-num_tokens // bs)
        # the window, plus the largest chunk computed at once, plus the partly used blocks at both ends
        span = min(num_tokens, self.window + self.config.max_num_batched_tokens)
        return min(-(-num_tokens // bs), -(-span // bs) + 1)

    # ------------------------------------------------------------------ state
    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._aborts)

    # ------------------------------------------------------------------ the engine's thread
    def take_aborted(self) -> list[Request]:
        """Requests aborted since the last call, out of every queue with their blocks freed."""
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
        order = [r for r in self.running if not r.prefilling] + [r for r in self.running if r.prefilling]
        for req in order:
            if req not in self.running or budget <= 0:  # preempted for an older request in this loop
                continue
            n = 1 if not req.prefilling else min(len(req.all_tokens) - req.computed, budget)
            if not self._make_room(req, req.computed + n, taken=step):
                continue  # req itself was preempted
            step.append((req, SeqChunk(start=req.computed, n=n, blocks=tuple(req.blocks))))
            budget -= n
        # Blocks that running prefills are about to fill: a request whose next uncached block is one of them waits a
        # step and finds it cached, instead of computing the same prefix again beside it.
        pending = {h for r in self.running if r.prefilling for h in r.prompt_hashes[len(r.hashes) :]}
        deferred: list[Request] = []
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            with self._lock:  # pop and admit together, so add()'s count stays consistent
                if not self.waiting:
                    break
                req = self.waiting[0]
                n = self._admit(req, budget, pending)
                if n == DEFER:
                    deferred.append(self.waiting.popleft())
                    continue
                if n == 0:
                    break
                self.waiting.popleft()
            self.running.append(req)
            pending.update(req.prompt_hashes[len(req.hashes) :])
            if req.scheduled is None:
                req.scheduled = time.monotonic()
            step.append((req, SeqChunk(start=req.computed, n=n, blocks=tuple(req.blocks))))
            budget -= n
        if deferred:
            with self._lock:
                self.waiting.extendleft(reversed(deferred))
        return step

    def _admit(self, req: Request, budget: int, pending: set[bytes]) -> int:
        """Give a waiting request its cached prefix and the blocks of its first chunk: the tokens it computes now;
        0 when they do not fit; DEFER when its next uncached block is being computed by another request."""
        tokens = req.all_tokens
        found: list[int] = []
        hashes: list[bytes] = []
        if self.pool.prefix_caching and not req.full_prompt:  # scoring or mean-pooling a prompt computes all of it
            # Full blocks of all but the newest token: the newest must be computed to get the next token's logits.
            hashes = req.prompt_hashes = block_hashes(tokens[:-1], self.block_size, parent=req.salt)
            found = self.pool.lookup(hashes)
            if len(found) < len(hashes) and hashes[len(found)] in pending:
                self.pool.undo_lookup(found, len(hashes))
                return DEFER
        req.blocks, req.hashes = list(found), hashes[: len(found)]
        req.cached_blocks = list(found)  # a window may free them below; their routed experts are read first
        req.computed = len(found) * self.block_size
        if not req.output:
            req.cached_tokens = req.computed
        n = min(len(tokens) - req.computed, budget)
        self._drop_out_of_window(req)
        if not self._grow(req, req.computed + n):
            self._release_all(req)
            return 0
        return n

    def _make_room(self, req: Request, upto: int, *, taken: list[tuple[Request, SeqChunk]]) -> bool:
        """Blocks for ``req`` up to position ``upto - 1``, preempting the newest running requests that are not in
        this step yet (``req`` itself last). False when ``req`` was preempted."""
        self._drop_out_of_window(req)
        in_step = {id(r) for r, _ in taken}
        while not self._grow(req, upto):
            victims = [r for r in self.running if r is not req and id(r) not in in_step]
            victim = victims[-1] if victims else req
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def _grow(self, req: Request, upto: int) -> bool:
        need = -(-upto // self.block_size) - len(req.blocks)
        if need > self.pool.num_free:
            return False
        req.blocks.extend(self.pool.allocate() for _ in range(need))
        return True

    def _drop_out_of_window(self, req: Request) -> None:
        """Free the blocks no query from position ``req.computed`` on can see: all positions <= computed - window."""
        if self.window is None:
            return
        dead = (req.computed - self.window + 1) // self.block_size
        for i in range(min(dead, len(req.blocks))):
            if req.blocks[i] != FREED:
                self.pool.release(req.blocks[i])
                req.blocks[i] = FREED

    def preempt(self, req: Request) -> None:
        """Free a running request's blocks and queue it first: it is recomputed and goes on where it was."""
        self.running.remove(req)
        self._release_all(req)
        req.computed = 0
        with self._lock:
            self.waiting.appendleft(req)
        self.preemptions += 1

    def computed(self, scheduled: list[tuple[Request, SeqChunk]]) -> None:
        """After a step ran: move each request past its chunk and name its newly full blocks for prefix reuse."""
        bs = self.block_size
        for req, chunk in scheduled:
            req.computed = chunk.start + chunk.n
            full = req.computed // bs
            if self.pool.prefix_caching and full > len(req.hashes):
                parent = req.hashes[-1] if req.hashes else req.salt  # cache_salt seeds the chain
                new = block_hashes(req.all_tokens[: full * bs], bs, start=len(req.hashes), parent=parent)
                for i, h in enumerate(new, start=len(req.hashes)):
                    if req.blocks[i] != FREED:
                        self.pool.register(req.blocks[i], h)
                req.hashes.extend(new)

    def finish(self, req: Request) -> None:
        """The request leaves: out of the running batch, its blocks freed, its id free for reuse."""
        if req in self.running:
            self.running.remove(req)
        self._release_all(req)
        with self._lock:
            self._by_id.pop(req.request_id, None)

    def _release_all(self, req: Request) -> None:
        for b in reversed(req.blocks):  # the tail first, so it is evicted before the shared head
            self.pool.release(b)
        req.blocks, req.hashes = [], []
