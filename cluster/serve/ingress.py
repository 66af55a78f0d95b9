"""Ingress deployment: OpenAI-compatible HTTP (FastAPI) and gRPC methods over one streaming frontend handle.

It validates requests, tokenizes, checks the API key and model name, streams server-sent events, maps errors to
HTTP status codes / gRPC codes in the OpenAI error shape, and keeps the Prometheus metrics.
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotations (Request) on the routes.

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.engine import RequestOutput
from cluster.errors import InvalidRequestError
from cluster.sampling import SamplingParams
from cluster.serve.args import AppArgs
from cluster.serve.metrics import ServeMetrics
from cluster.serve.protocol import ChatCompletionRequest, CompletionRequest
from cluster.tokenizer import ChatFormatError, Tokenizer

log = logging.getLogger("mixserve")

app = FastAPI(title="mixserve", description="OpenAI-compatible API of an expert-sharded Mixtral cluster")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}
GRPC_CODE_OF_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class ServeError(Exception):
    """An error with its HTTP status, gRPC code and OpenAI ``param``/``code`` fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, grpc_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.grpc_code = grpc_code or GRPC_CODE_OF_STATUS.get(status, "INTERNAL")

    @classmethod
    def from_item(cls, err: dict) -> "ServeError":
        return cls(err["http_status"], err["message"], param=err.get("param"), grpc_code=err.get("grpc_code"))

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.status,
            }
        }


class GrpcStatusError(RuntimeError):
    """Raised by a streaming gRPC method after it set the status code on the context."""


def error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return error_response(ServeError(400, "the request body is not valid JSON"))
    msg = first.get("msg", "invalid request")
    return error_response(ServeError(400, f"{param}: {msg}" if param else msg, param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(ServeError(exc.status_code, str(exc.detail)))


@app.exception_handler(ServeError)
async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    return error_response(exc)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_chunk(
    base: str, created: int, model: str, index: int, text: str, finish: str | None, logprobs: dict | None
) -> dict:
    return {
        "id": base,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def _pydantic_to_serve_error(e: Exception) -> ServeError:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        return ServeError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param=param)
    return ServeError(400, str(e))


# ---------------------------------------------------------------------- running requests
@dataclass
class _Choice:
    index: int
    prompt_ids: list[int]
    request_id: str
    stream: Any  # DeploymentResponseGenerator


def piece_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.id_to_piece(token_id).replace("\u2581", " ")


@serve.ingress(app)
class Ingress:
    """Deployment body; see :func:`cluster.serve.app.build_app` for how it is bound to the frontend."""

    def __init__(self, frontend: Any, args: dict[str, Any]) -> None:
        self.args = AppArgs(**args)
        self.frontend = frontend
        self.tokenizer = Tokenizer.from_dir(self.args.resolved_model())
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        self._max_model_len: int | None = None

    async def max_model_len(self) -> int:
        if self._max_model_len is None:
            info = await self.frontend.model_info.remote()
            self._max_model_len = int(info["max_model_len"])
        return self._max_model_len

    # -- shared checks ------------------------------------------------------------------------------------
    def check_key(self, authorization: str | None) -> None:
        if self.args.api_key is None:
            return
        if not authorization:
            raise ServeError(401, "missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != self.args.api_key:
            raise ServeError(401, "invalid API key")

    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.args.served_model_name):
            raise ServeError(
                404,
                f"the model {model!r} does not exist; this server serves {self.args.served_model_name!r}",
                param="model",
            )

    async def start(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> Any:
        """Submit one request; raises ServeError if the frontend refuses it (bad request, overload)."""
        gen = self.frontend.options(stream=True).generate.remote(prompt_ids, params, request_id)
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            gen.cancel()
            raise ServeError(408, "timed out waiting for the engine to accept the request") from None
        except Exception as e:
            raise ServeError(503, f"the frontend is unavailable: {type(e).__name__}") from None
        if "error" in first:
            raise ServeError.from_item(first["error"])
        return gen

    async def start_all(self, prompts: list[list[int]], params: SamplingParams, n: int, base_id: str) -> list[_Choice]:
        choices: list[_Choice] = []
        try:
            for pi, ids in enumerate(prompts):
                for j in range(n):
                    p = params
                    if n > 1 and params.seed is not None:
                        p = SamplingParams(**{**params.__dict__, "seed": params.seed + j})
                    rid = f"{base_id}-{pi * n + j}"
                    choices.append(_Choice(pi * n + j, ids, rid, await self.start(ids, p, rid)))
        except BaseException:
            for c in choices:
                c.stream.cancel()
            raise
        return choices

    async def merged(self, choices: list[_Choice], t0: float) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """Outputs of every choice as they come, with metrics and the request deadline applied."""
        queue: asyncio.Queue = asyncio.Queue()
        deadline = t0 + self.args.request_timeout_s

        async def pump(c: _Choice) -> None:
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
            while open_streams:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServeError(408, f"the request did not finish within {self.args.request_timeout_s:g}s")
                try:
                    c, item = await asyncio.wait_for(queue.get(), timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, Exception):
                    raise ServeError(503, f"the frontend failed: {type(item).__name__}")
                now = time.monotonic()
                if item.new_token_ids:
                    if c.index not in last_token:
                        self.metrics.ttft.observe(now - t0)
                    else:
                        gap = (now - last_token[c.index]) / len(item.new_token_ids)
                        for _ in item.new_token_ids:
                            self.metrics.itl.observe(gap)
                    last_token[c.index] = now
                if item.finish_reason == "error":
                    raise ServeError(503, f"generation failed: {item.error}", grpc_code="UNAVAILABLE")
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
                        await self.frontend.abort.remote(c.request_id)

    # -- logprob formatting ---------------------------------------------------------------------------------
    def completion_logprobs(self, out: RequestOutput, lps: list | None, offset: int) -> dict | None:
        if lps is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        pos = offset
        for lp in lps:
            t = piece_text(self.tokenizer, lp.token_id)
            tokens.append(t)
            token_lps.append(lp.logprob)
            tops.append({piece_text(self.tokenizer, i): v for i, v in lp.top})
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, lps: list | None) -> dict | None:
        if lps is None:
            return None

        def entry(i: int, v: float) -> dict:
            t = piece_text(self.tokenizer, i)
            return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps
            ]
        }

    # -- HTTP -------------------------------------------------------------------------------------------------
    def _count(self, endpoint: str, status: int) -> None:
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def handle(self, endpoint: str, request: Request, body_model: type, run) -> Response:
        t0 = time.monotonic()
        try:
            self.check_key(request.headers.get("authorization"))
            try:
                raw = await request.body()
                data = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ServeError(400, "the request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise ServeError(400, "the request body must be a JSON object")
            try:
                req = body_model.model_validate(data)
            except Exception as e:
                raise _pydantic_to_serve_error(e) from None
            self.check_model(req.model)
            response = await run(req, t0)
        except ServeError as e:
            self._count(endpoint, e.status)
            return error_response(e)
        except InvalidRequestError as e:
            self._count(endpoint, 400)
            return error_response(ServeError(400, str(e), param=e.param))
        except Exception:
            log.exception("unexpected error in %s", endpoint)
            self._count(endpoint, 500)
            return error_response(ServeError(500, "internal server error; see the server log"))
        if not isinstance(response, StreamingResponse):
            self._count(endpoint, response.status_code)
        return response

    def sse(self, endpoint: str, events: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            status = 200
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
            except ServeError as e:
                status = e.status
                yield f"data: {json.dumps(e.body())}\n\n".encode()
            finally:
                self._count(endpoint, status)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def run_completion(self, req: CompletionRequest, t0: float) -> Response:
        params = req.params()
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
        base = f"cmpl-{uuid.uuid4().hex}"
        choices = await self.start_all(prompts, params, req.n, base)
        created = int(time.time())
        model = self.args.served_model_name
        prompt_tokens = sum(len(p) for p in prompts)
        echo_text = {c.index: (self.tokenizer.decode(c.prompt_ids) if req.echo else "") for c in choices}

        if not req.stream:
            finals: dict[int, RequestOutput] = {}
            async for c, out in self.merged(choices, t0):
                if out.finished:
                    finals[c.index] = out
            self.metrics.e2e.observe(time.monotonic() - t0)
            completion_tokens = sum(len(o.token_ids) for o in finals.values())
            return JSONResponse(
                {
                    "id": base,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": i,
                            "text": echo_text[i] + finals[i].text,
                            "logprobs": self.completion_logprobs(finals[i], finals[i].logprobs, len(echo_text[i])),
                            "finish_reason": finals[i].finish_reason,
                        }
                        for i in sorted(finals)
                    ],
                    "usage": _usage(prompt_tokens, completion_tokens),
                }
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[dict]:
            completion_tokens = 0
            offsets = {i: len(t) for i, t in echo_text.items()}
            if req.echo:
                for i, t in echo_text.items():
                    yield _completion_chunk(base, created, model, i, t, None, None)
            async for c, out in self.merged(choices, t0):
                completion_tokens += len(out.new_token_ids)
                if not out.delta_text and not out.finished and not out.new_logprobs:
                    continue
                lp = self.completion_logprobs(out, out.new_logprobs, offsets[c.index])
                offsets[c.index] += len(out.delta_text)
                yield _completion_chunk(base, created, model, c.index, out.delta_text, out.finish_reason, lp)
            self.metrics.e2e.observe(time.monotonic() - t0)
            if include_usage:
                yield {
                    "id": base,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens),
                }

        return self.sse("completions", events())

    async def run_chat(self, req: ChatCompletionRequest, t0: float) -> Response:
        try:
            prompt = self.tokenizer.encode_chat(req.chat())
        except ChatFormatError as e:
            raise ServeError(400, str(e), param="messages") from None
        room = await self.max_model_len() - len(prompt)
        params = req.params(max_tokens_default=room)
        base = f"chatcmpl-{uuid.uuid4().hex}"
        choices = await self.start_all([prompt], params, req.n, base)
        created = int(time.time())
        model = self.args.served_model_name

        if not req.stream:
            finals: dict[int, RequestOutput] = {}
            async for c, out in self.merged(choices, t0):
                if out.finished:
                    finals[c.index] = out
            self.metrics.e2e.observe(time.monotonic() - t0)
            return JSONResponse(
                {
                    "id": base,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": finals[i].text},
                            "logprobs": self.chat_logprobs(finals[i].logprobs),
                            "finish_reason": finals[i].finish_reason,
                        }
                        for i in sorted(finals)
                    ],
                    "usage": _usage(len(prompt), sum(len(o.token_ids) for o in finals.values())),
                }
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
            return {
                "id": base,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }

        async def events() -> AsyncIterator[dict]:
            completion_tokens = 0
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""}, None)
            async for c, out in self.merged(choices, t0):
                completion_tokens += len(out.new_token_ids)
                lp = self.chat_logprobs(out.new_logprobs)
                if out.delta_text or lp:
                    yield chunk(c.index, {"content": out.delta_text}, None, lp)
                if out.finished:
                    yield chunk(c.index, {}, out.finish_reason)
            self.metrics.e2e.observe(time.monotonic() - t0)
            if include_usage:
                yield {
                    "id": base,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(len(prompt), completion_tokens),
                }

        return self.sse("chat_completions", events())

    # -- routes -----------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            self.check_key(request.headers.get("authorization"))
        except ServeError as e:
            self._count("models", e.status)
            return error_response(e)
        self._count("models", 200)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.args.served_model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "mixserve",
                        "max_model_len": await self.max_model_len(),
                    }
                ],
            }
        )

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.handle("completions", request, CompletionRequest, self.run_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.handle("chat_completions", request, ChatCompletionRequest, self.run_chat)

    @app.get("/health")
    async def health(self) -> Response:
        try:
            h = await asyncio.wait_for(self.frontend.health.remote(), timeout=10)
        except Exception as e:
            return JSONResponse({"status": "unavailable", "error": type(e).__name__}, status_code=503)
        if not h["ok"]:
            return JSONResponse({"status": "degraded", "workers": h["workers"]}, status_code=503)
        return JSONResponse({"status": "ok", "workers": h["workers"]})

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        snapshot = None
        try:
            snapshot = await asyncio.wait_for(self.frontend.stats.remote(), timeout=10)
            h = await asyncio.wait_for(self.frontend.health.remote(timeout_s=1.0), timeout=10)
            snapshot["workers_up"] = sum(1 for w in h["workers"] if w["ok"])
        except Exception as e:  # the request metrics still render; frontend gauges are left out this scrape
            log.warning("metrics: frontend snapshot unavailable (%s); exporting ingress metrics only", e)
            snapshot = None
        return Response(self.metrics.render(snapshot), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- gRPC (through Ray Serve's gRPC proxy; method names match service mixserve.v1.Generation) -------------
    def _grpc_request(self, request: Any, grpc_context: Any) -> tuple[list[int], SamplingParams]:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        self.check_key(metadata.get("authorization"))
        self.check_model(request.model or None)
        given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
        if sum(given) != 1:
            raise ServeError(400, "give exactly one of prompt, prompt_token_ids or messages", param="prompt")
        if request.prompt:
            ids = self.tokenizer.encode(request.prompt)
        elif request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
        else:
            try:
                ids = self.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in request.messages])
            except ChatFormatError as e:
                raise ServeError(400, str(e), param="messages") from None
        try:
            params = SamplingParams(
                max_tokens=request.max_tokens if request.HasField("max_tokens") else 16,
                temperature=request.temperature if request.HasField("temperature") else 1.0,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                top_k=request.top_k if request.HasField("top_k") else -1,
                seed=request.seed if request.HasField("seed") else None,
                stop=tuple(request.stop),
                stop_token_ids=tuple(request.stop_token_ids),
                ignore_eos=request.ignore_eos,
                logprobs=request.logprobs if request.HasField("logprobs") else None,
            )
        except ValueError as e:
            raise ServeError(400, str(e), param=getattr(e, "param", None)) from None
        return ids, params

    def _grpc_fail(self, grpc_context: Any, e: ServeError, method: str) -> None:
        import grpc

        self._count(method, e.status)
        if grpc_context is not None:
            grpc_context.set_code(getattr(grpc.StatusCode, e.grpc_code))
            grpc_context.set_details(e.message)

    def _grpc_logprobs(self, lps: list | None) -> list:
        from cluster.serve.proto import mixserve_pb2 as pb

        if not lps:
            return []
        return [
            pb.TokenLogprob(
                token_id=lp.token_id,
                token=piece_text(self.tokenizer, lp.token_id),
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=i, token=piece_text(self.tokenizer, i), logprob=v) for i, v in lp.top],
            )
            for lp in lps
        ]

    async def _grpc_outputs(self, request: Any, grpc_context: Any, t0: float):
        """Validate, submit, and stream (ids, request id, output) for one gRPC request."""
        ids, params = self._grpc_request(request, grpc_context)
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        choices = [_Choice(0, ids, rid, await self.start(ids, params, rid))]
        async for _, out in self.merged(choices, t0):
            yield ids, rid, out

    @staticmethod
    def _grpc_error(e: Exception) -> ServeError:
        return e if isinstance(e, ServeError) else ServeError(400, str(e), param=getattr(e, "param", None))

    def _grpc_reply(self, ids: list[int], rid: str, out: RequestOutput, *, whole: bool, first: bool) -> Any:
        """Generate: the whole result; GenerateStream: this step's delta (usage on the last reply)."""
        from cluster.serve.proto import mixserve_pb2 as pb

        reply = pb.GenerateReply(
            request_id=rid,
            text=out.text if whole else out.delta_text,
            token_ids=out.token_ids if whole else out.new_token_ids,
            finish_reason=out.finish_reason or "",
            logprobs=self._grpc_logprobs(out.logprobs if whole else out.new_logprobs),
            prompt_token_ids=ids if (whole or first) else [],
        )
        if out.finished:
            n = len(out.token_ids)
            reply.usage.CopyFrom(pb.Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n))
        return reply

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC method name
        from cluster.serve.proto import mixserve_pb2 as pb

        t0 = time.monotonic()
        reply = pb.GenerateReply()
        try:
            async for ids, rid, out in self._grpc_outputs(request, grpc_context, t0):
                if out.finished:
                    reply = self._grpc_reply(ids, rid, out, whole=True, first=True)
        except (ServeError, InvalidRequestError) as e:
            self._grpc_fail(grpc_context, self._grpc_error(e), "grpc_generate")
            return pb.GenerateReply()
        self._count("grpc_generate", 200)
        self.metrics.e2e.observe(time.monotonic() - t0)
        return reply

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        t0 = time.monotonic()
        try:
            first = True
            async for ids, rid, out in self._grpc_outputs(request, grpc_context, t0):
                yield self._grpc_reply(ids, rid, out, whole=False, first=first)
                first = False
        except (ServeError, InvalidRequestError) as e:
            err = self._grpc_error(e)
            self._grpc_fail(grpc_context, err, "grpc_generate_stream")
            # A streaming method reports its status by raising after setting the code (Ray Serve keeps the code).
            raise GrpcStatusError(err.message) from None
        self._count("grpc_generate_stream", 200)
        self.metrics.e2e.observe(time.monotonic() - t0)
