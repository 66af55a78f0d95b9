"""Runs an :class:`~cluster.engine.core.EngineCore` in a background thread and hands each request an async stream
of :class:`~cluster.engine.request.RequestOutput` deltas (the Serve frontend's engine)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator

from cluster.engine.core import EngineCore
from cluster.engine.request import Params, RequestOutput
from cluster.errors import EngineStoppedError, InvalidRequestError


class AsyncEngine:
    """Runs an :class:`EngineCore` in a background thread; each request gets an async stream of outputs."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mixserve-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.core.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception as e:  # defensive: the scheduler itself failed; fail everything in flight
                outputs = self.core.fail_running(e)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is not None:
                loop, q = entry
                with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
                    loop.call_soon_threadsafe(q.put_nowait, out)

    async def generate(
        self, prompt_token_ids: list[int], params: Params, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue at once (errors raise before the first item), then yield outputs until finished.

        Leaving the iteration early (client gone, task cancelled) aborts the request and frees its place in the batch
        and its KV blocks.
        """
        if self._stop:
            raise EngineStoppedError("the engine has been shut down")
        rid = request_id or uuid.uuid4().hex
        if rid in self._queues:  # still streamed to someone: a second queue under the same id would steal it
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
        q: asyncio.Queue = asyncio.Queue()
        entry = (asyncio.get_running_loop(), q)
        self._queues[rid] = entry
        try:
            self.core.add_request(rid, prompt_token_ids, params)
        except BaseException:
            self._release_queue(rid, entry)
            raise
        self._wake.set()
        return self._stream(rid, entry)

    async def _stream(
        self, rid: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue]
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out: RequestOutput = await entry[1].get()
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            self._release_queue(rid, entry)
            if not finished:
                self.abort(rid)

    def _release_queue(self, rid: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue]) -> None:
        # Only our own entry: the id may already belong to a newer request.
        if self._queues.get(rid) is entry:
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Abort a request whose stream will never be read (its consumer left before iterating it)."""
        self._queues.pop(request_id, None)
        self.abort(request_id)

    def shutdown(self) -> None:
        """Stop the engine thread and end every stream still open (finish_reason "abort", EngineStoppedError)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():  # a step is still running: leave the core alone
            return
        # Nothing steps the core any more: finish what is in flight so that no consumer waits forever.
        for rid in list(self._queues):
            self.core.abort(rid)
        outputs = self.core.finish_aborted()
        for out in outputs:
            out.error = EngineStoppedError("the engine has been shut down")
        self._deliver(outputs)
