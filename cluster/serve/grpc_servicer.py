"""Service ``mixserve.v1.Generation`` (cluster/serve/proto/mixserve.proto): Generate, GenerateStream and Tokenize.

A GenerateRequest runs as the HTTP request it stands for: with ``prompt`` or ``prompt_token_ids`` as a
:class:`~cluster.serve.protocol.CompletionRequest` (``n``, ``best_of``, ``echo``), with ``messages`` as a
:class:`~cluster.serve.protocol.ChatCompletionRequest` (``n``, ``tools``, ``tool_choice``). :func:`http_body`
builds the HTTP body from the fields the client set, and the request models, :mod:`~cluster.serve.tools`,
:mod:`~cluster.serve.tool_output` and :func:`~cluster.serve.completions.best_of` do the rest, so both APIs validate,
generate and assemble tool calls alike. What differs: ``max_tokens`` defaults to 16 with messages too, the
structured output comes from the ``response_format`` oneof (errors name its field), and a field of the other kind of
request (``echo`` / ``best_of`` with messages, tools with a prompt) is INVALID_ARGUMENT naming it.

Ray Serve's gRPC proxy calls the ingress methods of the same names, which delegate here. A failure sets the
gRPC status from :mod:`cluster.serve.errors` (GenerateStream then raises :class:`GrpcStatusError`, which is how
a streaming method reports its status through Ray Serve).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.engine import RequestOutput
from cluster.errors import InvalidRequestError, PromptTooLongError
from cluster.sampling import SamplingParams, StructuredOutput, TokenLogprob
from cluster.serve.auth import check_model
from cluster.serve.body import validate
from cluster.serve.completions import best_of
from cluster.serve.context import ServeContext
from cluster.serve.errors import GrpcStatusError, RequestTooLargeError, api_error, new_request_id, set_grpc_status
from cluster.serve.logprobs import piece_text
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.protocol import ChatCompletionRequest, CompletionRequest, TokenizeChatRequest
from cluster.serve.responses import ChatDelta, FinishReason, ToolCall, finish_reason
from cluster.serve.streams import Choice
from cluster.serve.structured import Constraint, submit_constrained
from cluster.serve.tool_output import MessageStream, final_message
from cluster.serve.tools import ToolPlan, as_prompt_tools, plan_tools

GENERATE = "grpc_generate"
GENERATE_STREAM = "grpc_generate_stream"
TOKENIZE = "grpc_tokenize"
DEFAULT_MAX_TOKENS = 16
# GenerateRequest fields copied as they are into the HTTP body when the client set them.
_AS_IS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "min_tokens",
    "n",
)
_PROMPT_ONLY = ("echo", "best_of")
_CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")


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


def _given(request: Any) -> set[str]:
    """The fields the client set (optional fields set, non-empty repeated fields, non-default scalars)."""
    return {f.name for f, _ in request.ListFields()}


def _message(m: pb.ChatMessage) -> dict[str, Any]:
    """A ChatMessage as the HTTP body's message (empty content on an assistant with tool calls: none)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content if m.content or not m.tool_calls else None}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type or "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def _tool(index: int, tool: pb.Tool) -> dict[str, Any]:
    """A Tool as the HTTP body's tool (``parameters``: the schema parsed from its JSON text)."""
    function: dict[str, Any] = {"name": tool.function.name}
    if tool.function.HasField("description"):
        function["description"] = tool.function.description
    if tool.function.parameters:
        param = f"tools.{index}.function.parameters"
        try:
            function["parameters"] = json.loads(tool.function.parameters)
        except ValueError as e:
            raise InvalidRequestError(f"{param}: not JSON text of a JSON schema: {e}", param=param) from None
    return {"type": tool.type or "function", "function": function}


def _chat_fields(request: Any) -> dict[str, Any]:
    """messages and tools of a GenerateRequest or TokenizeRequest, as the HTTP body has them."""
    body: dict[str, Any] = {"messages": [_message(m) for m in request.messages]}
    if request.tools:
        body["tools"] = [_tool(i, t) for i, t in enumerate(request.tools)]
    return body


def http_body(request: pb.GenerateRequest, *, stream: bool) -> dict[str, Any]:
    """The HTTP body (``/v1/completions`` with a prompt, ``/v1/chat/completions`` with messages) that ``request``
    stands for; InvalidRequestError names a field that its kind of request does not take."""
    given = _given(request)
    chat = "messages" in given
    for name in _PROMPT_ONLY if chat else _CHAT_ONLY:
        if name in given:
            where = "a prompt or prompt_token_ids, not to messages" if chat else "messages, not to a prompt"
            raise InvalidRequestError(f"{name} applies to {where}", param=name)
    body: dict[str, Any] = {name: getattr(request, name) for name in _AS_IS if name in given}
    body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    body["stream"] = stream
    if request.stop:
        body["stop"] = list(request.stop)
    if request.stop_token_ids:
        body["stop_token_ids"] = list(request.stop_token_ids)
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    if not chat:
        body["prompt"] = request.prompt if request.prompt else list(request.prompt_token_ids)
        body.update({name: getattr(request, name) for name in ("echo", "best_of", "logprobs") if name in given})
        return body
    body.update(_chat_fields(request))
    if "logprobs" in given:
        body["logprobs"], body["top_logprobs"] = True, request.logprobs
    if "parallel_tool_calls" in given:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    which = request.tool_choice.WhichOneof("choice")
    if which == "mode":
        body["tool_choice"] = request.tool_choice.mode
    elif which == "function":
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.function}}
    return body


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


def _one_constraint(own: Constraint | None, tools: Constraint | None) -> Constraint | None:
    """The response_format oneof's constraint or the one a forced tool call adds; both: INVALID_ARGUMENT naming the
    second (as :func:`cluster.serve.structured.request_constraint` does over HTTP)."""
    if own is not None and tools is not None:
        raise InvalidRequestError(
            f"{tools.param}: only one of the response_format fields and a tool_choice that forces a call may "
            f"constrain the output; {own.param} already does",
            param=tools.param,
        )
    return own if own is not None else tools


@dataclass(frozen=True)
class Job:
    """A GenerateRequest ready to run: its prompt ids, sampling parameters and how its choices are returned."""

    prompt: list[int]
    params: SamplingParams
    n: int  # choices returned
    candidates: int  # engine requests (best_of when it asks for more than n)
    constraint: Constraint | None
    plan: ToolPlan | None  # messages: how the assistant message uses tools; None with a prompt
    echo: bool
    logprobs: bool  # the client asked for logprobs


def _check_fits(ids: list[int], context: int, param: str) -> None:
    if len(ids) >= context:
        raise PromptTooLongError(
            f"this model's maximum context length is {context} tokens; the {param} take {len(ids)}", param=param
        )


async def prepare(ctx: ServeContext, request: pb.GenerateRequest, *, stream: bool) -> Job:
    """Validate ``request`` as its HTTP request and tokenize its prompt; InvalidRequestError names the bad field."""
    given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
    if sum(given) != 1:
        raise InvalidRequestError("give exactly one of prompt, prompt_token_ids or messages", param="prompt")
    body = http_body(request, stream=stream)
    vocab = await ctx.frontend.vocab_size()
    context = await ctx.frontend.max_model_len()
    own = constraint(request)
    logprobs = request.HasField("logprobs")
    if request.messages:
        chat = validate(body, ChatCompletionRequest)
        plan = plan_tools(chat, ctx.tokenizer)
        structured = _one_constraint(own, plan.constraint)
        ids = await ctx.encode_chat(chat.chat(), tools=plan.prompt_tools)
        _check_fits(ids, context, "messages")
        params = chat.params(
            max_tokens_default=context - len(ids),
            vocab_size=vocab,
            structured=structured.output if structured else None,
        )
        return Job(ids, params, chat.n, chat.n, structured, plan, False, logprobs)
    completion = validate(body, CompletionRequest)
    (item,) = completion.prompts()
    params = completion.params(vocab_size=vocab, structured=own.output if own else None)
    ids = await ctx.encode(item) if isinstance(item, str) else list(item)
    _check_fits(ids, context, "prompt")
    return Job(ids, params, completion.n, completion.candidates, own, None, completion.echo, logprobs)


def _logprobs(ctx: ServeContext, lps: Sequence[TokenLogprob | None] | None) -> list[pb.TokenLogprob]:
    """Token logprobs (a None entry, the first prompt token's, has no logprob and no alternatives)."""
    tok = ctx.tokenizer
    out = []
    for lp in lps or ():
        if lp is None:
            out.append(pb.TokenLogprob())
            continue
        top = [pb.TopLogprob(token_id=i, token=piece_text(tok, i), logprob=v) for i, v in lp.top]
        out.append(
            pb.TokenLogprob(token_id=lp.token_id, token=piece_text(tok, lp.token_id), logprob=lp.logprob, top=top)
        )
    return out


def _prompt_logprobs(ctx: ServeContext, job: Job, out: RequestOutput) -> list[pb.TokenLogprob]:
    """Echo with logprobs: each prompt token, scored given the ones before it."""
    if not (job.echo and job.logprobs) or out.prompt_logprobs is None:
        return []
    lps = _logprobs(ctx, out.prompt_logprobs)
    lps[0].token_id, lps[0].token = job.prompt[0], piece_text(ctx.tokenizer, job.prompt[0])  # its logprob stays unset
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
        "logprobs": _logprobs(ctx, out.logprobs) if job.logprobs else [],
        "tool_calls": calls,
        "prompt_logprobs": _prompt_logprobs(ctx, job, out),
    }


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _start(
    ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any, rid: str, *, stream: bool
) -> tuple[Job, list[Choice], str]:
    """Check and submit; the job, its engine requests and the echoed prompt text ('' without echo)."""
    _admit(ctx, request, grpc_context)
    job = await prepare(ctx, request, stream=stream)
    choices = await submit_constrained(ctx, [job.prompt], job.params, job.candidates, rid, job.constraint)
    echo = await ctx.decode(job.prompt) if job.echo else ""
    return job, choices, echo


async def _generate(ctx: ServeContext, request: pb.GenerateRequest, grpc_context: Any, rid: str) -> pb.GenerateReply:
    t0 = time.monotonic()
    job, choices, echo = await _start(ctx, request, grpc_context, rid, stream=False)
    finals: dict[int, RequestOutput] = {}
    async for c, out in ctx.frontend.merged(choices, t0):
        if out.finished:
            finals[c.index] = out
    kept = best_of(finals, n=job.n, candidates=job.candidates)
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
    async for c, out in ctx.frontend.merged(choices, t0):
        first = c.index not in started
        started.add(c.index)
        completion_tokens += len(out.new_token_ids)
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
            logprobs=_logprobs(ctx, out.new_logprobs) if job.logprobs else [],
            tool_calls=pieces,
            prompt_token_ids=job.prompt if first else [],
            prompt_logprobs=_prompt_logprobs(ctx, job, out) if first else [],
        )
        open_choices -= 1 if out.finished else 0
        if open_choices == 0:
            reply.usage.CopyFrom(_usage(len(job.prompt), completion_tokens))
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
        _admit(ctx, request, grpc_context)
        if bool(request.prompt) == bool(request.messages):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if request.tools and not request.messages:
            raise InvalidRequestError("tools applies to messages, not to a prompt", param="tools")
        if request.prompt:
            bos = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await ctx.encode(request.prompt, bos=bos)
        else:
            chat = validate(_chat_fields(request), TokenizeChatRequest)
            ids = await ctx.encode_chat(chat.chat(), tools=as_prompt_tools(chat.tools) if chat.tools else None)
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
