"""Service ``mixserve.v1.Generation`` (cluster/serve/proto/mixserve.proto): Generate, GenerateStream and Tokenize
(Embed, Classify and Score: :mod:`cluster.serve.ingress.grpc_api.pooling`).

A GenerateRequest runs as the HTTP request it stands for (:mod:`cluster.serve.ingress.grpc_api.request` validates it and
tokenizes its prompt); the replies are built here from the same pieces as the HTTP responses
(:mod:`~cluster.serve.ingress.openai_api.tool_output`, :func:`~cluster.serve.ingress.openai_api.completions.best_of`),
so both APIs generate and assemble tool calls alike.

Ray Serve's gRPC proxy calls the ingress methods of the same names, which delegate here. A failure sets the
gRPC status from :mod:`cluster.serve.ingress.errors` (GenerateStream then raises :class:`GrpcStatusError`, which is how
a streaming method reports its status through Ray Serve).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cluster.engine.request import RequestOutput
from cluster.engine.sampling import TokenLogprob
from cluster.errors import InvalidRequestError
from cluster.serve.ingress.auth import check_model
from cluster.serve.ingress.body import validate
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.errors import (
    GrpcStatusError,
    RequestTooLargeError,
    api_error,
    new_request_id,
    set_grpc_status,
)
from cluster.serve.ingress.grpc_api.request import Job, chat_fields, prepare
from cluster.serve.ingress.openai_api.completions import best_of
from cluster.serve.ingress.openai_api.logprobs import piece_text
from cluster.serve.ingress.openai_api.protocol import TokenizeChatRequest
from cluster.serve.ingress.openai_api.responses import ChatDelta, FinishReason, ToolCall, finish_reason
from cluster.serve.ingress.openai_api.routed import routed_bytes
from cluster.serve.ingress.openai_api.structured import submit_constrained
from cluster.serve.ingress.openai_api.tool_output import MessageStream, final_message
from cluster.serve.ingress.openai_api.tools import as_prompt_tools
from cluster.serve.ingress.streams import Choice
from cluster.serve.proto import mixserve_pb2 as pb

GENERATE = "grpc_generate"
GENERATE_STREAM = "grpc_generate_stream"
TOKENIZE = "grpc_tokenize"


def _authorization(grpc_context: Any) -> str | None:
    metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
    return metadata.get("authorization")


def admit(ctx: ServeContext, request: Any, grpc_context: Any) -> None:
    """API key, message size (the proxy's own limit is RAY_SERVE_GRPC_MAX_MESSAGE_SIZE) and model name."""
    ctx.keys.check(_authorization(grpc_context))
    size = request.ByteSize()
    if size > ctx.args.serving.max_request_bytes:
        raise RequestTooLargeError(
            f"the request message is {size} bytes; this server accepts at most {ctx.args.serving.max_request_bytes}"
        )
    check_model(ctx.model_names, request.model or None)


def _logprobs(ctx: ServeContext, lps: Sequence[TokenLogprob | None] | None, as_ids: bool) -> list[pb.TokenLogprob]:
    """Token logprobs (a None entry, the first prompt token's, has no logprob and no alternatives); each token's
    text and bytes as over HTTP (``token_id:<id>`` with return_tokens_as_token_ids)."""
    tok = ctx.tokenizer
    out = []
    for lp in lps or ():
        if lp is None:
            out.append(pb.TokenLogprob())
            continue
        top = [
            pb.TopLogprob(token_id=i, token=piece_text(tok, i, as_ids), logprob=v, token_bytes=tok.token_bytes(i))
            for i, v in lp.top
        ]
        out.append(
            pb.TokenLogprob(
                token_id=lp.token_id,
                token=piece_text(tok, lp.token_id, as_ids),
                logprob=lp.logprob,
                top=top,
                token_bytes=tok.token_bytes(lp.token_id),
                rank=lp.rank,
            )
        )
    return out


def _prompt_logprobs(ctx: ServeContext, job: Job, out: RequestOutput) -> list[pb.TokenLogprob]:
    """Echo with logprobs, or prompt_logprobs: each prompt token, scored given the ones before it."""
    if not (job.echo and job.logprobs or job.prompt_logprobs) or out.prompt_logprobs is None:
        return []
    lps = _logprobs(ctx, out.prompt_logprobs, job.as_ids)
    first = job.prompt[0]  # its logprob stays unset: nothing precedes it
    lps[0].token_id, lps[0].token = first, piece_text(ctx.tokenizer, first, job.as_ids)
    lps[0].token_bytes = ctx.tokenizer.token_bytes(first)
    return lps


def _call(index: int, call: ToolCall) -> pb.ToolCall:
    function = pb.FunctionCall(name=call.function.name, arguments=call.function.arguments)
    return pb.ToolCall(index=index, id=call.id, type=call.type, function=function)


def _call_pieces(deltas: list[ChatDelta]) -> tuple[str, list[pb.ToolCall]]:
    """The content and the tool-call pieces of a step's chat deltas (content always comes before calls)."""
    text = "".join(d.content or "" for d in deltas)
    pieces = []
    for d in deltas:
        for tc in d.tool_calls or ():
            name, arguments = (tc.function.name, tc.function.arguments) if tc.function else (None, None)
            function = pb.FunctionCall(name=name or "", arguments=arguments or "")
            pieces.append(pb.ToolCall(index=tc.index, id=tc.id or "", type=tc.type or "", function=function))
    return text, pieces


def _choice_fields(ctx: ServeContext, job: Job, index: int, out: RequestOutput, echo: str) -> dict[str, Any]:
    """One finished choice as the fields of pb.Choice (and of a GenerateReply)."""
    calls: list[pb.ToolCall] = []
    reason: FinishReason | None
    if job.plan is not None:
        message, reason = final_message(job.plan, ctx.tokenizer, out)
        text = message.content or ""
        calls = [_call(i, c) for i, c in enumerate(message.tool_calls or ())]
    else:
        text, reason = echo + out.text, finish_reason(out.finish_reason)
    return {
        "index": index,
        "text": text,
        "token_ids": out.token_ids,
        "finish_reason": reason or "",
        "logprobs": _logprobs(ctx, out.logprobs, job.as_ids) if job.logprobs else [],
        "tool_calls": calls,
        "prompt_logprobs": _prompt_logprobs(ctx, job, out),
        "stop_reason": "" if out.stop_reason is None else str(out.stop_reason),
        **_routed(out),
    }


def _routed(out: RequestOutput) -> dict[str, Any]:
    """A finished output's routed experts as the reply fields (int32 LE bytes and the shape); none without."""
    if out.routed_experts is None:
        return {}
    return {"routed_experts": routed_bytes(out.routed_experts), "routed_experts_shape": list(out.routed_experts.shape)}


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _start(
    ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any, rid: str, *, stream: bool
) -> tuple[Job, list[Choice], str]:
    """Check and submit; the job, its engine requests and the echoed prompt text ('' without echo)."""
    admit(ctx, request, grpc_context)
    job = await prepare(ctx, request, stream=stream)
    choices = await submit_constrained(ctx, [job.prompt], job.params, rid, job.constraint)
    echo = await ctx.decode(job.prompt) if job.echo else ""
    return job, choices, echo


async def _generate(ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any, rid: str) -> pb.GenerateReply:
    t0 = time.monotonic()
    job, choices, echo = await _start(ctx, request, grpc_context, rid, stream=False)
    finals: dict[int, RequestOutput] = {}
    async for c, out in ctx.frontend.merged(choices, t0):
        if out.finished:
            finals[c.index] = out
    kept = best_of(finals, job.params)
    fields = [_choice_fields(ctx, job, k, finals[i], echo) for k, i in enumerate(kept)]
    return pb.GenerateReply(
        request_id=rid,
        prompt_token_ids=job.prompt,
        usage=_usage(len(job.prompt), sum(len(o.token_ids) for o in finals.values())),
        choices=[pb.Choice(**f) for f in fields],
        **fields[0],
    )


async def _stream(
    ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any, rid: str
) -> AsyncIterator[pb.GenerateReply]:
    """One reply per choice and step: its new tokens, text (or content and tool-call pieces) and logprobs."""
    t0 = time.monotonic()
    job, choices, echo = await _start(ctx, request, grpc_context, rid, stream=True)
    plan = job.plan
    messages = {c.index: MessageStream(plan, ctx.tokenizer) for c in choices} if plan is not None else {}
    started: set[int] = set()
    open_choices, completion_tokens = len(choices), 0
    generated = {c.index: 0 for c in choices}
    async for c, out in ctx.frontend.merged(choices, t0):
        first = c.index not in started
        started.add(c.index)
        completion_tokens += len(out.new_token_ids)
        generated[c.index] += len(out.new_token_ids)
        pieces: list[pb.ToolCall] = []
        if plan is not None:
            deltas, reason = messages[c.index].feed(out)
            text, pieces = _call_pieces(deltas)
        else:
            text, reason = (echo if first else "") + out.delta_text, finish_reason(out.finish_reason)
        reply = pb.GenerateReply(
            request_id=rid,
            index=c.index,
            text=text,
            token_ids=out.new_token_ids,
            finish_reason=reason or "",
            logprobs=_logprobs(ctx, out.new_logprobs, job.as_ids) if job.logprobs else [],
            tool_calls=pieces,
            prompt_token_ids=job.prompt if first else [],
            prompt_logprobs=_prompt_logprobs(ctx, job, out) if first else [],
            stop_reason="" if out.stop_reason is None or not out.finished else str(out.stop_reason),
            **_routed(out),  # the finished output's only
        )
        open_choices -= 1 if out.finished else 0
        if open_choices == 0:
            reply.usage.CopyFrom(_usage(len(job.prompt), completion_tokens))
        elif request.continuous_usage_stats:  # vLLM's continuous usage: this choice's tokens so far
            reply.usage.CopyFrom(_usage(len(job.prompt), generated[c.index]))
        yield reply


async def generate(ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateReply:
    rid = request.request_id or new_request_id("grpc")
    try:
        reply = await _generate(ctx, request, grpc_context, rid)
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
    rid = request.request_id or new_request_id("grpc")
    try:
        async for reply in _stream(ctx, request, grpc_context, rid):
            yield reply
    except Exception as e:
        err = api_error(e, request_id=rid)
        ctx.metrics.count(GENERATE_STREAM, err.status)
        set_grpc_status(grpc_context, err)
        raise GrpcStatusError(err.message) from None
    ctx.metrics.count(GENERATE_STREAM, 200)


async def tokenize(ctx: ServeContext, request: pb.TokenizeRequest, grpc_context: Any = None) -> pb.TokenizeReply:
    """The token ids of exactly one of prompt or messages (with the tools, as HTTP's /tokenize renders them)."""
    try:
        admit(ctx, request, grpc_context)
        if bool(request.prompt) == bool(request.messages):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if request.tools and not request.messages:
            raise InvalidRequestError("tools applies to messages, not to a prompt", param="tools")
        if request.prompt:
            bos = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await ctx.encode(request.prompt, bos=bos)
        else:
            chat = validate(chat_fields(request), TokenizeChatRequest)
            tools = as_prompt_tools(chat.tools) if chat.tools else None
            ids = await ctx.encode_chat(chat.chat(), tools=tools, options=chat.chat_options())
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
