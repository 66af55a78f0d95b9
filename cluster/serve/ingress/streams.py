"""Requests to the frontend deployment and their output streams, as the routes and gRPC methods use them.

:class:`FrontendClient` submits a request (the frontend's first stream item says whether it was accepted), fans
one request out into ``n`` choices, and merges their streams under the request deadline, observing TTFT and
inter-token latency; leaving a merged stream early (client gone, error, deadline) aborts what is still running.
Every failure is raised as a :mod:`cluster.errors` class, so :mod:`cluster.serve.ingress.errors` maps it.
:func:`sse_response` encodes events as server-sent events, an error as a last OpenAI error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from ray.exceptions import RayTaskError

from cluster.engine import fanout
from cluster.engine.request import Params, RequestOutput
from cluster.engine.sampling import SamplingParams
from cluster.errors import InternalError, MixserveError, RequestTimeoutError, UnavailableError
from cluster.serve.ingress.errors import api_error
from cluster.serve.ingress.metrics import ServeMetrics
from cluster.serve.stream_items import Accepted

log = logging.getLogger("mixserve")


@dataclass
class Choice:
    """One engine request: choice ``index`` of an API request, sent with ``params`` to the frontend replica
    ``frontend``; ``retried`` once it was sent again to another replica after its first one vanished."""

    index: int
    prompt_ids: list[int]
    request_id: str
    stream: Any  # ray.serve.handle.DeploymentResponseGenerator
    params: Params | None = None  # sampling, or pooling (cluster.engine.pooling)
    frontend: str = ""
    retried: bool = False


def frontend_failure(e: Exception) -> Exception:
    """What a failure of the frontend handle itself (not an error item it sent) means for the request.

    The frontend raised: its own :class:`MixserveError`, or anything else as it is (a bug: 500). The replica is
    gone or unreachable: :class:`UnavailableError`.
    """
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, MixserveError) else e
    if isinstance(e, MixserveError):
        return e
    return UnavailableError(f"the frontend is unavailable: {type(e).__name__}")


def vanished(e: Exception) -> bool:
    """Whether a frontend call failed because its replica is gone (not because the frontend raised)."""
    return not isinstance(e, RayTaskError | MixserveError)


def output_error(out: RequestOutput) -> Exception:
    """The error of an output that finished with ``finish_reason == "error"`` (or carries an error)."""
    if isinstance(out.error, MixserveError):
        return out.error
    return InternalError(f"request {out.request_id} failed without an error", request_id=out.request_id)


class FrontendClient:
    """The frontend deployment handle, with the request deadline and the latency metrics."""

    def __init__(self, handle: Any, *, timeout_s: float, metrics: ServeMetrics) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._info: dict[str, Any] | None = None

    async def model_info(self) -> dict[str, Any]:
        """The frontend's ``model_info()`` (max_model_len, vocab_size, hidden_size, the head's labels), asked once."""
        if self._info is None:
            try:
                info = await asyncio.wait_for(self.handle.model_info.remote(), timeout=self.timeout_s)
            except TimeoutError:
                raise UnavailableError("the frontend did not answer in time") from None
            except Exception as e:
                raise frontend_failure(e) from e
            self._info = dict(info)
        return self._info

    async def max_model_len(self) -> int:
        return int((await self.model_info())["max_model_len"])

    async def vocab_size(self) -> int:
        return int((await self.model_info())["vocab_size"])

    async def submit(self, prompt_ids: list[int], params: Params, request_id: str) -> tuple[Any, str]:
        """Start one engine request: its output stream and the frontend replica that accepted it. Raises the
        frontend's refusal (bad request, overload), RequestTimeoutError when it does not answer in time,
        UnavailableError when no frontend is there. A replica that vanishes before accepting is replaced by another
        one, once (the Serve handle routes the second try to a live replica)."""
        for attempt in (0, 1):
            gen = self.handle.options(stream=True).generate.remote(prompt_ids, params, request_id)
            try:
                first = await asyncio.wait_for(gen.__anext__(), timeout=self.timeout_s)
            except TimeoutError:
                gen.cancel()
                raise RequestTimeoutError("timed out waiting for the engine to accept the request") from None
            except Exception as e:
                if attempt == 0 and vanished(e):
                    continue
                raise frontend_failure(e) from e
            if isinstance(first, BaseException):
                gen.cancel()
                raise first
            if not isinstance(first, Accepted):
                gen.cancel()
                raise InternalError(f"the frontend answered {type(first).__name__} instead of accepting")
            self.metrics.accepted(first.engine)
            return gen, first.frontend
        raise AssertionError("unreachable")

    async def submit_all(self, prompts: list[list[int]], params: SamplingParams, base_id: str) -> list[Choice]:
        """``params.candidates`` engine requests per prompt (``cluster.engine.fanout.expand``: n, or best_of;
        with a seed, candidate j samples with seed + j), numbered prompt-major."""
        choices: list[Choice] = []
        candidates = fanout.expand(params)
        try:
            for pi, ids in enumerate(prompts):
                for j, p in enumerate(candidates):
                    index = pi * len(candidates) + j
                    rid = f"{base_id}-{index}"
                    stream, frontend = await self.submit(ids, p, rid)
                    choices.append(Choice(index, ids, rid, stream, p, frontend))
        except BaseException:
            for c in choices:
                c.stream.cancel()
            raise
        return choices

    async def merged(self, choices: list[Choice], t0: float) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Outputs of every choice as they come, until all finish or the deadline (``t0`` + timeout) passes."""
        queue: asyncio.Queue = asyncio.Queue()
        deadline = t0 + self.timeout_s

        async def pump(c: Choice) -> None:
            try:
                async for out in c.stream:
                    await queue.put((c, out))
            except Exception as e:
                await queue.put((c, e))
            finally:
                await queue.put((c, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        open_streams = len(choices)
        last_token: dict[int, float] = {}
        try:
            max_model_len = await self.max_model_len()
            while open_streams:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestTimeoutError(f"the request did not finish within {self.timeout_s:g}s")
                try:
                    c, item = await asyncio.wait_for(queue.get(), timeout=remaining)
                except TimeoutError:
                    continue
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, Exception):
                    if await self._resubmit(c, item, started=c.index in last_token):
                        open_streams += 1  # the failed stream's end (None) is still to come
                        tasks.append(asyncio.create_task(pump(c)))
                        continue
                    raise frontend_failure(item) from item
                self._observe(c, item, last_token, t0)
                if item.finish_reason == "error" or item.error is not None:
                    raise output_error(item)
                if item.finished:
                    self.metrics.finished(
                        e2e_s=time.monotonic() - t0,
                        queue_s=(item.metrics or {}).get("queue_time"),
                        prompt_tokens=len(c.prompt_ids),
                        generation_tokens=len(item.token_ids),
                        max_model_len=max_model_len,
                    )
                yield c, item
        finally:
            for t in tasks:
                t.cancel()
            for c in choices:
                with contextlib.suppress(Exception):
                    c.stream.cancel()
            if open_streams:
                for c in choices:
                    with contextlib.suppress(Exception):
                        await self.handle.abort.remote(c.request_id)

    async def _resubmit(self, c: Choice, error: Exception, *, started: bool) -> bool:
        """Send choice ``c`` again when its frontend replica vanished before it produced a token (once): True when
        it now streams from another replica."""
        if started or c.retried or c.params is None or not vanished(error):
            return False
        c.retried = True
        log.warning("request %s: frontend %s vanished before its first token; sent again", c.request_id, c.frontend)
        c.stream, c.frontend = await self.submit(c.prompt_ids, c.params, c.request_id)
        return True

    def _observe(self, c: Choice, out: RequestOutput, last_token: dict[int, float], t0: float) -> None:
        if not out.new_token_ids:
            return
        now = time.monotonic()
        if c.index not in last_token:
            self.metrics.ttft.observe(now - t0)
        else:
            gap = (now - last_token[c.index]) / len(out.new_token_ids)
            for _ in out.new_token_ids:
                self.metrics.itl.observe(gap)
        last_token[c.index] = now


# Characters that JSON may leave raw inside strings but that str.splitlines() (and so many SSE clients that read
# lines with it, httpx's aiter_lines among them) takes for line breaks: escaped, so an event stays on one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data.translate(_LINE_BREAKS)}\n\n".encode()


def sse_response(
    events: AsyncIterator[BaseModel], *, request_id: str, on_done: Callable[[int], None]
) -> StreamingResponse:
    """Server-sent events ending in ``data: [DONE]``. An error after the stream started (the status line is
    already 200) is sent as a last event in the OpenAI error shape; ``on_done`` gets the status it stands for."""

    async def body() -> AsyncIterator[bytes]:
        status = 200
        try:
            async for event in events:
                yield sse_event(event)
        except Exception as e:
            err = api_error(e, request_id=request_id)
            status = err.status
            yield sse_event(err.body())
        finally:
            on_done(status)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
