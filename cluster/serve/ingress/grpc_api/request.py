"""A gRPC ``GenerateRequest`` as the HTTP request it stands for, validated and tokenized (:func:`prepare`).

With ``prompt`` or ``prompt_token_ids`` it is a :class:`~cluster.serve.ingress.openai_api.protocol.CompletionRequest`
(``n``, ``best_of``, ``echo``); with ``messages`` a
:class:`~cluster.serve.ingress.openai_api.protocol.ChatCompletionRequest` (``n``, ``tools``, ``tool_choice``, the
chat template's options). vLLM's extensions (:mod:`~cluster.serve.ingress.openai_api.extras`) go into the body by
the same names. :func:`http_body` builds the HTTP body from the fields the client set, and the request models and
:mod:`~cluster.serve.ingress.openai_api.tools` do the rest, so both APIs validate alike (and ``max_tokens`` defaults
alike: 16 with a prompt, what is left of the context with messages). What differs: the structured output comes
from the ``response_format`` oneof (errors name its field), and a field of the other kind of request (``echo`` /
``best_of`` with messages, tools or chat template options with a prompt) is INVALID_ARGUMENT naming it. The replies
are :mod:`cluster.serve.ingress.grpc_api.servicer`'s.
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
    # vLLM's extensions
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "return_tokens_as_token_ids",
    "priority",
    "cache_salt",
    "length_penalty",
    "use_beam_search",
    "return_routed_experts",
)
_REPEATED = ("stop", "stop_token_ids", "allowed_token_ids", "bad_words")
_PROMPT_ONLY = ("echo", "best_of")
_CHAT_ONLY = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "documents",
)


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
    body.update({name: list(getattr(request, name)) for name in _REPEATED if name in given})
    body["stream"] = stream
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    if not chat:
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        body["prompt"] = request.prompt if request.prompt else list(request.prompt_token_ids)
        body.update({name: getattr(request, name) for name in ("echo", "best_of", "logprobs") if name in given})
        return body
    body.update(chat_fields(request))
    body.update(_template_fields(request, given))
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


def _template_fields(request: pb.GenerateRequest, given: set[str]) -> dict[str, Any]:
    """The chat template options of a GenerateRequest as the HTTP body has them (chat_template_kwargs: the JSON
    object of its text)."""
    body: dict[str, Any] = {
        name: getattr(request, name) for name in ("add_generation_prompt", "continue_final_message") if name in given
    }
    if request.documents:
        body["documents"] = [dict(d.fields) for d in request.documents]
    if request.chat_template_kwargs:
        try:
            body["chat_template_kwargs"] = json.loads(request.chat_template_kwargs)
        except ValueError as e:
            raise InvalidRequestError(
                f"chat_template_kwargs: not the JSON text of an object: {e}", param="chat_template_kwargs"
            ) from None
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
    as_ids: bool = False  # return_tokens_as_token_ids
    prompt_logprobs: bool = False  # the client asked for prompt_logprobs


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
    flags = {
        "logprobs": request.HasField("logprobs"),
        "as_ids": request.return_tokens_as_token_ids,
        "prompt_logprobs": request.HasField("prompt_logprobs"),
    }
    if request.messages:
        chat = validate(body, ChatCompletionRequest)
        plan = plan_tools(chat, ctx.tokenizer)
        structured = _one_constraint(own, plan.constraint)
        ids = await ctx.encode_chat(chat.chat(), tools=plan.prompt_tools, options=chat.chat_options())
        ids = chat.truncate(ids, context)
        _check_fits(ids, context, "messages")
        params = chat.params(
            max_tokens_default=context - len(ids),
            vocab_size=vocab,
            structured=structured.output if structured else None,
        )
        return Job(ids, params, structured, plan, echo=False, **flags)
    completion = validate(body, CompletionRequest)
    (item,) = completion.prompts()
    params = completion.params(vocab_size=vocab, structured=own.output if own else None)
    ids = completion.truncate(await ctx.encode(item) if isinstance(item, str) else list(item), context)
    _check_fits(ids, context, "prompt")
    return Job(ids, params, own, None, echo=completion.echo, **flags)
