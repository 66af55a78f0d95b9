"""Ingress deployment: the FastAPI app (OpenAI-compatible HTTP) and the gRPC methods, wired to the modules that
do the work: ``openai_api`` (completions, chat, tokenize, embeddings, classify and score), ``grpc_api`` (servicer,
pooling), ``health`` and ``metrics`` of
this package. Every error reaches the client through :mod:`cluster.serve.ingress.errors`.

Who needs the API key (when one is configured): ``/v1/*``, ``/tokenize``, ``/detokenize``, ``/classify``, ``/score``
and every gRPC method.
``/health``, ``/metrics``, ``/version`` and the API docs are open (probes and scrapers carry no key).
"""

# No ``from __future__ import annotations`` here: FastAPI must see real annotations (Request) on the routes.

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.checkpoint.locate import model_folder
from cluster.config.serving import AppArgs
from cluster.errors import ModelNotFoundError
from cluster.serve.ingress import cors
from cluster.serve.ingress.auth import ApiKeys, check_model
from cluster.serve.ingress.body import parse_body, read_body, validation_error
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.errors import api_error, error_response, http_error, new_request_id
from cluster.serve.ingress.grpc_api import pooling as grpc_pooling
from cluster.serve.ingress.grpc_api import servicer as grpc_servicer
from cluster.serve.ingress.health import HealthMonitor, HealthResponse
from cluster.serve.ingress.metrics import ServeMetrics, frontend_snapshots, ingress_exports
from cluster.serve.ingress.openai_api import chat, classify, completions, embeddings
from cluster.serve.ingress.openai_api import tokenize as tokenization
from cluster.serve.ingress.openai_api.pooling_protocol import (
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ScoreRequest,
    ScoreResponse,
)
from cluster.serve.ingress.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from cluster.serve.ingress.openai_api.responses import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
    json_response,
)
from cluster.serve.ingress.streams import FrontendClient
from cluster.text.tokenizer import Tokenizer

log = logging.getLogger("mixserve")

app = FastAPI(title="mixserve", description="OpenAI-compatible API of an expert-sharded Mixtral cluster")
app.add_middleware(cors.ConfiguredCORS)

RequestT = TypeVar("RequestT")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 500, 503)
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _documented(request: list[type[BaseModel]], stream: type[BaseModel] | None = None) -> dict[str, Any]:
    """Route options documenting a JSON request body (parsed by the route itself, so that the API key is checked
    before the body is read) and, with ``stream``, the server-sent events of ``stream: true``."""
    schema = _ref(request[0]) if len(request) == 1 else {"anyOf": [_ref(m) for m in request]}
    body = {"required": True, "content": {"application/json": {"schema": schema}}}
    ok = {200: {"content": {"text/event-stream": {"schema": _ref(stream)}}}} if stream else {}
    return {"openapi_extra": {"requestBody": body}, "responses": {**ok, **ERROR_RESPONSES}}


# Schemas that only _documented refers to; FastAPI puts those of response_model / responses there itself.
EXTRA_SCHEMAS = [
    (CompletionRequest, "validation"),
    (ChatCompletionRequest, "validation"),
    (TokenizeCompletionRequest, "validation"),
    (TokenizeChatRequest, "validation"),
    (DetokenizeRequest, "validation"),
    (EmbeddingRequest, "validation"),
    (ClassificationRequest, "validation"),
    (ScoreRequest, "validation"),
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


def _version() -> str:
    try:
        return version("mixserve")
    except PackageNotFoundError:
        return "unknown"


@serve.ingress(app)
class Ingress:
    """Deployment body; see :func:`cluster.serve.app.build_app` for how it is bound to the frontend."""

    def __init__(self, frontend: Any, args: dict[str, Any]) -> None:
        a = AppArgs.from_options(args)
        replica = serve.get_replica_context()
        metrics = ServeMetrics(a.model_name, max_num_seqs=a.engine.max_num_seqs, replica=replica.replica_id.unique_id)
        # this deployment itself: /metrics asks the other ingress replicas for their counts through it
        self.ingresses = serve.get_deployment_handle(replica.deployment, replica.app_name)
        keys = ApiKeys.from_args(a)
        cors.configure(a.serving.cors_allowed_origins)
        self.frontend = frontend
        folder = model_folder(a.load.model, download=a.load.download)
        self.ctx = ServeContext(
            args=a,
            tokenizer=Tokenizer.from_dir(folder, tokenizer=a.load.tokenizer),
            frontend=FrontendClient(frontend, timeout_s=a.serving.request_timeout_s, metrics=metrics),
            metrics=metrics,
            keys=keys,
            health=HealthMonitor(frontend),
            created=int(time.time()),
        )
        if not keys.enabled:
            log.warning(
                "mixserve: no API key configured: anyone who reaches the HTTP or gRPC port can generate (the gRPC "
                "proxy binds every interface unless Ray was started as `mixserve serve` starts it); set api_key_env "
                "/ api_key_file / api_key"
            )

    async def _serve(
        self,
        endpoint: str,
        request: Request,
        parse: Callable[[bytes], RequestT],
        id_prefix: str,
        run: Callable[[ServeContext, RequestT, str, float], Awaitable[Response]],
    ) -> Response:
        """API key, body (size-limited, parsed off the event loop), model name, then ``run``; any error becomes the
        OpenAI error response (and a count)."""
        t0 = time.monotonic()
        request_id = new_request_id(id_prefix)
        ctx = self.ctx
        try:
            ctx.keys.check(request.headers.get("authorization"))
            raw = await read_body(request, ctx.args.serving.max_request_bytes)
            req = await ctx.offload(parse, raw)
            check_model(ctx.model_names, getattr(req, "model", None))
            response = await run(ctx, req, request_id, t0)
        except Exception as e:
            err = api_error(e, request_id=request_id)
            ctx.metrics.count(endpoint, err.status)
            return error_response(err)
        if not isinstance(response, StreamingResponse):  # a stream counts itself when it ends
            ctx.metrics.count(endpoint, response.status_code)
        return response

    async def _models(self, request: Request, model_id: str | None) -> Response:
        ctx = self.ctx
        try:
            ctx.keys.check(request.headers.get("authorization"))
            max_model_len = await ctx.frontend.max_model_len()
            names = ctx.model_names if model_id is None else [model_id]
            if model_id is not None and model_id not in ctx.model_names:
                raise ModelNotFoundError(
                    f"the model {model_id!r} does not exist; this server serves {ctx.model_name!r}"
                )
            cards = [
                ModelCard(id=n, created=ctx.created, root=ctx.model_name, max_model_len=max_model_len) for n in names
            ]
        except Exception as e:
            err = api_error(e)
            ctx.metrics.count("models", err.status)
            return error_response(err)
        ctx.metrics.count("models", 200)
        return json_response(ModelList(data=cards) if model_id is None else cards[0])

    # -- HTTP routes -----------------------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(self, request: Request) -> Response:
        return await self._models(request, None)

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(self, request: Request, model_id: str) -> Response:
        return await self._models(request, model_id)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        **_documented([CompletionRequest], CompletionStreamResponse),
    )
    async def completions(self, request: Request) -> Response:
        parse = functools.partial(parse_body, model=CompletionRequest)
        return await self._serve(completions.ENDPOINT, request, parse, "cmpl", completions.create_completion)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        **_documented([ChatCompletionRequest], ChatCompletionStreamResponse),
    )
    async def chat_completions(self, request: Request) -> Response:
        parse = functools.partial(parse_body, model=ChatCompletionRequest)
        return await self._serve(chat.ENDPOINT, request, parse, "chatcmpl", chat.create_chat_completion)

    @app.post(
        "/tokenize",
        response_model=TokenizeResponse,
        **_documented([TokenizeCompletionRequest, TokenizeChatRequest]),
    )
    async def tokenize(self, request: Request) -> Response:
        return await self._serve(
            tokenization.TOKENIZE, request, tokenization.parse_tokenize, "tok", tokenization.tokenize
        )

    @app.post("/detokenize", response_model=DetokenizeResponse, **_documented([DetokenizeRequest]))
    async def detokenize(self, request: Request) -> Response:
        return await self._serve(
            tokenization.DETOKENIZE, request, tokenization.parse_detokenize, "detok", tokenization.detokenize
        )

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, **_documented([EmbeddingRequest]))
    async def embeddings(self, request: Request) -> Response:
        parse = functools.partial(parse_body, model=EmbeddingRequest)
        return await self._serve(embeddings.ENDPOINT, request, parse, "embd", embeddings.create_embedding)

    @app.post("/classify", response_model=ClassificationResponse, **_documented([ClassificationRequest]))
    async def classify(self, request: Request) -> Response:
        parse = functools.partial(parse_body, model=ClassificationRequest)
        return await self._serve(classify.CLASSIFY, request, parse, "classify", classify.create_classification)

    @app.post("/score", response_model=ScoreResponse, **_documented([ScoreRequest]))
    @app.post("/v1/score", response_model=ScoreResponse, include_in_schema=False)
    async def score(self, request: Request) -> Response:
        parse = functools.partial(parse_body, model=ScoreRequest)
        return await self._serve(classify.SCORE, request, parse, "score", classify.create_score)

    @app.get("/version", response_model=VersionResponse)
    async def version(self) -> Response:
        return json_response(VersionResponse(version=_version()))

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(self) -> Response:
        status, body = await self.ctx.health.check()
        return json_response(body, status)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_text(self) -> Response:
        self.ctx.health.start()
        metrics = self.ctx.metrics
        # a few snapshot calls at once, which the handle spreads over the frontend replicas at random: twice one
        # more than seen so far (a replica missed keeps its last snapshot, up to STALE_SNAPSHOT_S)
        # and as many of the other ingress replicas, through this deployment's own handle
        snapshots, ingresses = await asyncio.gather(
            frontend_snapshots(self.frontend, asks=2 * (metrics.known_frontends() + 1)),
            ingress_exports(self.ingresses, asks=2 * metrics.known_ingresses()),
        )
        text = metrics.render(snapshots, self.ctx.health.latest(), ingresses)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def metrics_export(self) -> tuple[str, list[Any]]:
        """This replica's id and own counts, for the ingress replica answering a ``/metrics`` scrape."""
        return self.ctx.metrics.export()

    # -- gRPC (Ray Serve's gRPC proxy calls these by the names of service mixserve.v1.Generation) -------------
    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC method name
        return await grpc_servicer.generate(self.ctx, request, grpc_context)

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        async for reply in grpc_servicer.generate_stream(self.ctx, request, grpc_context):
            yield reply

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_servicer.tokenize(self.ctx, request, grpc_context)

    async def Embed(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_pooling.embed(self.ctx, request, grpc_context)

    async def Classify(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_pooling.classify(self.ctx, request, grpc_context)

    async def Score(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await grpc_pooling.score(self.ctx, request, grpc_context)
