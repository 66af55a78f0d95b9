"""A gRPC ``GenerateRequest`` as the HTTP request it stands for, validated and tokenized (:func:`prepare`).

With ``prompt`` or ``prompt_token_ids`` it is a :class:`~cluster.serve.ingress.openai_api.protocol.CompletionRequest`
(``n``, ``best_of``, ``echo``); with ``messages`` a
:class:`~cluster.serve.ingress.openai_api.protocol.ChatCompletionRequest` (``n``, ``tools``, ``tool_choice``).
:func:`http_body` builds the HTTP body from the fields the client set, and the request models and
:mod:`~cluster.serve.ingress.openai_api.tools` do the rest, so both APIs validate alike. What differs: ``max_tokens``
defaults to 16 with messages too, the structured output comes from the ``response_format`` oneof (errors name its
field), and a field of the other kind of request (``echo`` / ``best_of`` with messages, tools with a prompt) is
INVALID_ARGUMENT naming it. The replies are :mod:`cluster.serve.ingress.grpc_api.servicer`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cluster.engine.sampling import SamplingParams, StructuredOutput
from cluster.errors import InvalidRequestError, PromptTooLongError
from cluster.serve.ingress.body import validate
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from cluster.serve.ingress.openai_api.structured import Constraint
from cluster.serve.ingress.openai_api.tools import ToolPlan, plan_tools
from cluster.serve.proto import mixserve_pb2 as pb

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


def chat_fields(request: Any) -> dict[str, Any]:
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
    body.update(chat_fields(request))
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
    second (as :func:`cluster.serve.ingress.openai_api.structured.request_constraint` does over HTTP)."""
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
    params: SamplingParams  # with n and best_of (cluster.engine.fanout)
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
        return Job(ids, params, structured, plan, False, logprobs)
    completion = validate(body, CompletionRequest)
    (item,) = completion.prompts()
    params = completion.params(vocab_size=vocab, structured=own.output if own else None)
    ids = await ctx.encode(item) if isinstance(item, str) else list(item)
    _check_fits(ids, context, "prompt")
    return Job(ids, params, own, None, completion.echo, logprobs)
