"""Ingress deployment: the FastAPI app (OpenAI-compatible HTTP) and the gRPC methods, wired to the modules that
do the work: :mod:`~cluster.serve.completions`, :mod:`~cluster.serve.chat`, :mod:`~cluster.serve.grpc_servicer`,
:mod:`~cluster.serve.health`, :mod:`~cluster.serve.metrics`. Every error reaches the client through
:mod:`cluster.serve.errors`.
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotations (Request) on the routes.

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve import chat, completions, grpc_servicer
from cluster.serve.args import AppArgs
from cluster.serve.auth import check_api_key, check_model
from cluster.serve.context import ServeContext
from cluster.serve.errors import api_error, error_response, http_error, new_request_id
from cluster.serve.health import check_health
from cluster.serve.metrics import ServeMetrics, frontend_snapshot
from cluster.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    json_response,
    parse_body,
    validation_error,
)
from cluster.serve.streams import FrontendClient
from cluster.tokenizer import Tokenizer

app = FastAPI(title="mixserve", description="OpenAI-compatible API of an expert-sharded Mixtral cluster")

RequestT = TypeVar("RequestT", bound=BaseModel)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 500, 503)
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _documented(request: type[BaseModel], stream: type[BaseModel]) -> dict[str, Any]:
    """Route options documenting a JSON request body (parsed by the route itself, so that the API key is checked
    before the body) and the server-sent events of ``stream: true``."""
    body = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return {
        "openapi_extra": {"requestBody": body},
        "responses": {200: {"content": {"text/event-stream": {"schema": _ref(stream)}}}, **ERROR_RESPONSES},
    }


# Schemas that only _documented refers to; FastAPI puts those of response_model / responses there itself.
EXTRA_SCHEMAS = [
    (CompletionRequest, "validation"),
    (ChatCompletionRequest, "validation"),
    (CompletionStreamResponse, "serialization"),
    (ChatCompletionStreamResponse, "serialization"),
]


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema(EXTRA_SCHEMAS, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(api_error(validation_error(exc.errors())))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return error_response(http_error(exc.status_code, str(exc.detail)))


@serve.ingress(app)
class Ingress:
    """Deployment body; see :func:`cluster.serve.app.build_app` for how it is bound to the frontend."""

    def __init__(self, frontend: Any, args: dict[str, Any]) -> None:
        a = AppArgs(**args)
        metrics = ServeMetrics()
        self.frontend = frontend
        self.ctx = ServeContext(
            args=a,
            tokenizer=Tokenizer.from_dir(a.resolved_model(), tokenizer=a.tokenizer),
            frontend=FrontendClient(frontend, timeout_s=a.request_timeout_s, metrics=metrics),
            metrics=metrics,
            created=int(time.time()),
        )

    async def _serve(
        self,
        endpoint: str,
        request: Request,
        body_model: type[RequestT],
        id_prefix: str,
        run: Callable[[ServeContext, RequestT, str, float], Awaitable[Response]],
    ) -> Response:
        """API key, body, model name, then ``run``; any error becomes the OpenAI error response (and a count)."""
        t0 = time.monotonic()
        request_id = new_request_id(id_prefix)
        try:
            check_api_key(self.ctx.args.api_key, request.headers.get("authorization"))
            req = parse_body(await request.body(), body_model)
            check_model(self.ctx.model_name, getattr(req, "model", None))
            response = await run(self.ctx, req, request_id, t0)
        except Exception as e:
            err = api_error(e, request_id=request_id)
            self.ctx.metrics.count(endpoint, err.status)
            return error_response(err)
        if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
            self.ctx.metrics.count(endpoint, response.status_code)
        return response

    # -- HTTP routes -----------------------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, request: Request) -> Response:
        try:
            check_api_key(self.ctx.args.api_key, request.headers.get("authorization"))
            card = ModelCard(
                id=self.ctx.model_name, created=self.ctx.created, max_model_len=await self.ctx.frontend.max_model_len()
            )
        except Exception as e:
            err = api_error(e)
            self.ctx.metrics.count("models", err.status)
            return error_response(err)
        self.ctx.metrics.count("models", 200)
        return json_response(ModelList(data=[card]))

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        **_documented(CompletionRequest, CompletionStreamResponse),
    )
    async def completions(self, request: Request) -> Response:
        return await self._serve(
            completions.ENDPOINT, request, CompletionRequest, "cmpl", completions.create_completion
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        **_documented(ChatCompletionRequest, ChatCompletionStreamResponse),
    )
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(chat.ENDPOINT, request, ChatCompletionRequest, "chatcmpl", chat.create_chat_completion)

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(self) -> Response:
        status, body = await check_health(self.frontend)
        return json_response(body, status)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_text(self) -> Response:
        text = self.ctx.metrics.render(await frontend_snapshot(self.frontend))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- gRPC (Ray Serve's gRPC proxy calls these by the names of service mixserve.v1.Generation) -------------
    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC method name
        return await grpc_servicer.generate(self.ctx, request, grpc_context)

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        async for reply in grpc_servicer.generate_stream(self.ctx, request, grpc_context):
            yield reply
