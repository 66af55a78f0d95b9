"""Service ``mixserve.v1.Generation`` (cluster/serve/proto/mixserve.proto): Generate, GenerateStream and Tokenize.

Ray Serve's gRPC proxy calls the ingress methods of the same names, which delegate here. A failure sets the
gRPC status from :mod:`cluster.serve.errors` (GenerateStream then raises :class:`GrpcStatusError`, which is how
a streaming method reports its status through Ray Serve).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cluster.engine import RequestOutput
from cluster.errors import InvalidRequestError, SamplingParamsError
from cluster.sampling import SamplingParams, StructuredOutput, TokenLogprob
from cluster.serve.auth import check_model
from cluster.serve.context import ServeContext
from cluster.serve.errors import GrpcStatusError, RequestTooLargeError, api_error, new_request_id, set_grpc_status
from cluster.serve.logprobs import piece_text
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.streams import Choice
from cluster.serve.structured import Constraint, renamed

GENERATE = "grpc_generate"
GENERATE_STREAM = "grpc_generate_stream"
TOKENIZE = "grpc_tokenize"


def _authorization(grpc_context: Any) -> str | None:
    metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
    return metadata.get("authorization")


def _admit(ctx: ServeContext, request: Any, grpc_context: Any) -> None:
    """API key, message size (the proxy's own limit is RAY_SERVE_GRPC_MAX_MESSAGE_SIZE) and model name."""
    ctx.keys.check(_authorization(grpc_context))
    size = request.ByteSize()
    if size > ctx.args.max_request_bytes:
        raise RequestTooLargeError(
            f"the request message is {size} bytes; this server accepts at most {ctx.args.max_request_bytes}"
        )
    check_model(ctx.model_names, request.model or None)


def _chat(messages: Any) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _optional(request: Any, name: str, default: Any) -> Any:
    return getattr(request, name) if request.HasField(name) else default


def constraint(request: pb.GenerateRequest) -> Constraint | None:
    """The structured output of the ``response_format`` oneof, named by its field."""
    which = request.WhichOneof("response_format")
    if which is None or (which == "json_object" and not request.json_object):
        return None
    if which == "json_schema":
        output = StructuredOutput("json_schema", request.json_schema)
    elif which == "json_object":
        output = StructuredOutput("json_object")
    elif which == "regex":
        output = StructuredOutput("regex", request.regex)
    elif which == "choice":
        output = StructuredOutput("choice", json.dumps(list(request.choice.choices)))
    else:
        output = StructuredOutput("lark", request.grammar)
    return Constraint(output, which)


async def prompt_and_params(ctx: ServeContext, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
    """The prompt ids (from exactly one of prompt, prompt_token_ids, messages) and the sampling parameters;
    InvalidRequestError (or a subclass) names the bad field."""
    given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
    if sum(given) != 1:
        raise InvalidRequestError("give exactly one of prompt, prompt_token_ids or messages", param="prompt")
    if request.prompt:
        ids = await ctx.encode(request.prompt)
    elif request.prompt_token_ids:
        ids = list(request.prompt_token_ids)
    else:
        ids = await ctx.encode_chat(_chat(request.messages))
    vocab = await ctx.frontend.vocab_size()
    if any(not 0 <= t < vocab for t in request.logit_bias):
        raise InvalidRequestError(f"logit_bias: token ids must be in [0, {vocab})", param="logit_bias")
    structured = constraint(request)
    params = SamplingParams(
        max_tokens=_optional(request, "max_tokens", 16),
        temperature=_optional(request, "temperature", 1.0),
        top_p=_optional(request, "top_p", 1.0),
        top_k=_optional(request, "top_k", -1),
        seed=_optional(request, "seed", None),
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=_optional(request, "logprobs", None),
        presence_penalty=_optional(request, "presence_penalty", 0.0),
        frequency_penalty=_optional(request, "frequency_penalty", 0.0),
        repetition_penalty=_optional(request, "repetition_penalty", 1.0),
        min_p=_optional(request, "min_p", 0.0),
        min_tokens=_optional(request, "min_tokens", 0),
        logit_bias=tuple(request.logit_bias.items()),
        structured_output=structured.output if structured else None,
    )
    return ids, params


async def _outputs(
    ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any, rid: str, t0: float
) -> AsyncIterator[tuple[list[int], RequestOutput]]:
    """Check, submit, and stream (prompt ids, output) for one request."""
    _admit(ctx, request, grpc_context)
    ids, params = await prompt_and_params(ctx, request)
    try:
        stream = await ctx.frontend.submit(ids, params, rid)
    except SamplingParamsError as e:
        raise renamed(e, constraint(request)) from None
    choices = [Choice(0, ids, rid, stream)]
    async for _, out in ctx.frontend.merged(choices, t0):
        yield ids, out


def _logprobs(ctx: ServeContext, lps: Sequence[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    if not lps:
        return []
    tok = ctx.tokenizer
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            token=piece_text(tok, lp.token_id),
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=i, token=piece_text(tok, i), logprob=v) for i, v in lp.top],
        )
        for lp in lps
    ]


def _reply(
    ctx: ServeContext, ids: list[int], rid: str, out: RequestOutput, *, whole: bool, first: bool
) -> pb.GenerateReply:
    """Generate: the whole result; GenerateStream: this step's delta (usage on the last reply)."""
    reply = pb.GenerateReply(
        request_id=rid,
        text=out.text if whole else out.delta_text,
        token_ids=out.token_ids if whole else out.new_token_ids,
        finish_reason=out.finish_reason or "",
        logprobs=_logprobs(ctx, out.logprobs if whole else out.new_logprobs),
        prompt_token_ids=ids if (whole or first) else [],
    )
    if out.finished:
        n = len(out.token_ids)
        reply.usage.CopyFrom(pb.Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n))
    return reply


async def generate(ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateReply:
    t0 = time.monotonic()
    rid = request.request_id or new_request_id("grpc")
    reply = pb.GenerateReply()
    try:
        async for ids, out in _outputs(ctx, request, grpc_context, rid, t0):
            if out.finished:
                reply = _reply(ctx, ids, rid, out, whole=True, first=True)
    except Exception as e:
        err = api_error(e, request_id=rid)
        ctx.metrics.count(GENERATE, err.status)
        set_grpc_status(grpc_context, err)
        return pb.GenerateReply()
    ctx.metrics.count(GENERATE, 200)
    return reply


async def generate_stream(
    ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any = None
) -> AsyncIterator[pb.GenerateReply]:
    t0 = time.monotonic()
    rid = request.request_id or new_request_id("grpc")
    try:
        first = True
        async for ids, out in _outputs(ctx, request, grpc_context, rid, t0):
            yield _reply(ctx, ids, rid, out, whole=False, first=first)
            first = False
    except Exception as e:
        err = api_error(e, request_id=rid)
        ctx.metrics.count(GENERATE_STREAM, err.status)
        set_grpc_status(grpc_context, err)
        raise GrpcStatusError(err.message) from None
    ctx.metrics.count(GENERATE_STREAM, 200)


async def tokenize(ctx: ServeContext, request: pb.TokenizeRequest, grpc_context: Any = None) -> pb.TokenizeReply:
    """The token ids of exactly one of prompt or messages."""
    try:
        _admit(ctx, request, grpc_context)
        if bool(request.prompt) == bool(request.messages):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if request.prompt:
            ids = await ctx.encode(request.prompt, bos=_optional(request, "add_special_tokens", True))
        else:
            ids = await ctx.encode_chat(_chat(request.messages))
        strs = [ctx.tokenizer.id_to_piece(i) for i in ids] if request.return_token_strs else []
        reply = pb.TokenizeReply(
            count=len(ids), max_model_len=await ctx.frontend.max_model_len(), tokens=ids, token_strs=strs
        )
    except Exception as e:
        err = api_error(e)
        ctx.metrics.count(TOKENIZE, err.status)
        set_grpc_status(grpc_context, err)
        return pb.TokenizeReply()
    ctx.metrics.count(TOKENIZE, 200)
    return reply
