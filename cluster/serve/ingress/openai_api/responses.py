"""The OpenAI-compatible responses as pydantic models: completions, chat, their streamed chunks, logprobs, usage,
models, tokenize / detokenize, version, errors and health. The routes declare them, so ``/openapi.json``
documents every body they return."""

from __future__ import annotations

from typing import Any, Literal, cast

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


def finish_reason(reason: str | None) -> FinishReason | None:
    """An output's finish reason as clients see it: never "error" (an output that failed is raised instead);
    "tool_calls" when a chat message ends in tool calls (:mod:`cluster.serve.ingress.openai_api.tool_output`)."""
    return cast("FinishReason | None", reason)


def _omit_none(description: str | None = None) -> Any:
    """A field left out of the JSON when None (stream deltas and usage are absent, not null, as OpenAI sends)."""
    return Field(None, exclude_if=lambda v: v is None, description=description)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: one entry per generated token; ``text_offset`` counts characters."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (echo): nothing comes before it
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob`` of a prompt token (``prompt_logprobs``): its rank among all tokens and its text."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class RoutedExperts(BaseModel):
    """With return_routed_experts (or the server's enable_return_routed_experts): on a choice, or on a streamed
    choice's final chunk (``cluster.serve.ingress.openai_api.routed``)."""

    routed_experts: str | None = _omit_none(
        "base64 of the [tokens, layers, top_k] expert ids (tokens = prompt + generated - 1), flattened, int32 LE"
    )
    routed_experts_shape: list[int] | None = _omit_none("[tokens, layers, top_k]")


class CompletionChoice(RoutedExperts):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = _omit_none("vLLM's: the stop string or stop token id that ended the choice")
    prompt_logprobs: PromptLogprobs | None = _omit_none("vLLM's prompt_logprobs: per prompt token (the first: null)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed completion; the last one (with ``stream_options.include_usage``) has no
    choices and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _omit_none()


class ChatTopLogprob(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's text as UTF-8 bytes")


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the message only calls tools")
    tool_calls: list[ToolCall] | None = _omit_none()


class FunctionCallDelta(BaseModel):
    name: str | None = _omit_none()
    arguments: str | None = _omit_none()


class ToolCallDelta(BaseModel):
    """A piece of tool call ``index`` of a streamed message: its first piece has the id, type and name; the pieces'
    ``arguments`` joined are the call's arguments."""

    index: int
    id: str | None = _omit_none()
    type: Literal["function"] | None = _omit_none()
    function: FunctionCallDelta | None = _omit_none()


class ChatDelta(BaseModel):
    """What a streamed chat chunk adds: the role on the first chunk, then content or tool-call pieces; empty on
    the finishing chunk."""

    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[ToolCallDelta] | None = _omit_none()


class ChatCompletionChoice(RoutedExperts):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = _omit_none("vLLM's: the stop string or stop token id that ended the choice")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = _omit_none("vLLM's prompt_logprobs: per prompt token (the first: null)")


class ChatStreamChoice(RoutedExperts):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = _omit_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixserve"
    root: str = Field(description="the model every served name stands for: the first served name")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    """vLLM's /tokenize answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = _omit_none()


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    """A response model as JSON (serialized once, by pydantic)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")
