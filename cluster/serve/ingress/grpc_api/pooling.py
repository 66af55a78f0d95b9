"""gRPC methods Embed, Classify and Score of ``mixserve.v1.Generation``: each request is read as the HTTP body it
mirrors (``/v1/embeddings``, ``/classify``, ``/score``), validated by the same request models and run by
:mod:`cluster.serve.ingress.openai_api.pooling`, so both APIs check and compute alike.

``input`` (texts) or ``input_token_ids`` (one ``TokenIds`` per input): exactly one of them. A failure sets the
status from :mod:`cluster.serve.ingress.errors` (INVALID_ARGUMENT naming the field, NOT_FOUND for an unknown model,
RESOURCE_EXHAUSTED for overload, ...) and returns an empty reply, as Generate does.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cluster.errors import InvalidRequestError
from cluster.serve.ingress.body import validate
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.errors import api_error, new_request_id, set_grpc_status
from cluster.serve.ingress.grpc_api.servicer import admit
from cluster.serve.ingress.openai_api import pooling
from cluster.serve.ingress.openai_api.pooling_protocol import ClassificationRequest, EmbeddingRequest, ScoreRequest
from cluster.serve.proto import mixserve_pb2 as pb

EMBED = "grpc_embed"
CLASSIFY = "grpc_classify"
SCORE = "grpc_score"
ReplyT = TypeVar("ReplyT")

_EMBED_FIELDS = ("pooling", "normalize", "truncate_prompt_tokens", "dimensions", "add_special_tokens")
_CLASSIFY_FIELDS = ("truncate_prompt_tokens", "activation", "add_special_tokens")


def _given(request: Any) -> set[str]:
    return {f.name for f, _ in request.ListFields()}


def body_of(request: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The HTTP body an Embed or Classify request stands for (only the fields the client set)."""
    texts, ids = list(request.input), [list(t.ids) for t in request.input_token_ids]
    if bool(texts) == bool(ids):
        raise InvalidRequestError("give exactly one of input (texts) or input_token_ids", param="input")
    given = _given(request)
    return {"input": texts or ids, **{n: getattr(request, n) for n in names if n in given}}


def _usage(tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=tokens, total_tokens=tokens)


async def _unary(
    ctx: ServeContext,
    endpoint: str,
    request: Any,
    grpc_context: Any,
    run: Callable[[str, float], Awaitable[ReplyT]],
    empty: Callable[[], ReplyT],
) -> ReplyT:
    """Admit (key, size, model), run under the request id, count; a failure sets the gRPC status."""
    rid = request.request_id or new_request_id("grpc")
    t0 = time.monotonic()
    try:
        admit(ctx, request, grpc_context)
        reply = await run(rid, t0)
    except Exception as e:
        err = api_error(e, request_id=rid)
        ctx.metrics.count(endpoint, err.status)
        set_grpc_status(grpc_context, err)
        return empty()
    ctx.metrics.count(endpoint, 200)
    return reply


async def embed(ctx: ServeContext, request: pb.EmbedRequest, grpc_context: Any = None) -> pb.EmbedReply:
    async def run(rid: str, t0: float) -> pb.EmbedReply:
        req = validate(body_of(request, _EMBED_FIELDS), EmbeddingRequest)
        pooled = await pooling.embed(ctx, req, rid, t0)
        data = [pb.Embedding(index=i, embedding=v.float().tolist()) for i, v in enumerate(pooled.vectors)]
        return pb.EmbedReply(request_id=rid, model=ctx.model_name, data=data, usage=_usage(pooled.prompt_tokens))

    return await _unary(ctx, EMBED, request, grpc_context, run, pb.EmbedReply)


async def classify(ctx: ServeContext, request: pb.ClassifyRequest, grpc_context: Any = None) -> pb.ClassifyReply:
    async def run(rid: str, t0: float) -> pb.ClassifyReply:
        req = validate(body_of(request, _CLASSIFY_FIELDS), ClassificationRequest)
        pooled = await pooling.classify(ctx, req, rid, t0)
        facts = await pooling.model_facts(ctx)
        data = [
            pb.Classification(index=i, label=pooling.label_of(facts, v), probs=v.float().tolist(), num_classes=len(v))
            for i, v in enumerate(pooled.vectors)
        ]
        return pb.ClassifyReply(request_id=rid, model=ctx.model_name, data=data, usage=_usage(pooled.prompt_tokens))

    return await _unary(ctx, CLASSIFY, request, grpc_context, run, pb.ClassifyReply)


async def score(ctx: ServeContext, request: pb.ScoreRequest, grpc_context: Any = None) -> pb.ScoreReply:
    async def run(rid: str, t0: float) -> pb.ScoreReply:
        body: dict[str, Any] = {"text_1": list(request.text_1), "text_2": list(request.text_2)}
        if request.HasField("truncate_prompt_tokens"):
            body["truncate_prompt_tokens"] = request.truncate_prompt_tokens
        scores, tokens = await pooling.score(ctx, validate(body, ScoreRequest), rid, t0)
        data = [pb.ScoreData(index=i, score=s) for i, s in enumerate(scores)]
        return pb.ScoreReply(request_id=rid, model=ctx.model_name, data=data, usage=_usage(tokens))

    return await _unary(ctx, SCORE, request, grpc_context, run, pb.ScoreReply)
