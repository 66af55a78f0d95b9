"""The OpenAI-compatible API as pydantic models: requests (with the translation to our SamplingParams) and
responses (completions, chat, their streamed chunks, logprobs, usage, models, errors).

Request problems raise :class:`~cluster.errors.InvalidRequestError` with ``param`` naming the field (HTTP 400).
The routes declare these models, so ``/openapi.json`` documents every body they take and return.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar, cast

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from cluster.errors import InvalidRequestError
from cluster.sampling import SamplingParams

Number = StrictInt | float
RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_body(raw: bytes, model: type[RequestT]) -> RequestT:
    """The JSON request body as ``model``; InvalidRequestError names the first bad field."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors: Any) -> InvalidRequestError:
    """The first of pydantic's / FastAPI's validation errors, with ``param`` the field's dotted path."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequestError("the request body is not valid JSON")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    msg = first.get("msg", "invalid request")
    return InvalidRequestError(f"{param}: {msg}" if param else str(msg), param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, plus top_k / ignore_eos / stop ids)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    user: str | None = None

    def sampling_params(self, *, max_tokens_default: int, logprobs: int | None) -> SamplingParams:
        if not 1 <= self.n <= 16:
            raise InvalidRequestError("n must be between 1 and 16", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise InvalidRequestError(f"{name} is not supported by this server (only 0)", param=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        max_tokens = self.max_tokens if self.max_tokens is not None else max_tokens_default
        return SamplingParams(  # SamplingParamsError (a 400 naming the parameter) when one is out of range
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            items: list[Any] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [list(p)]
        else:
            items = list(p)
        if not items:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        for item in items:
            if isinstance(item, str) and item == "":
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            if isinstance(item, list) and not item:
                raise InvalidRequestError("prompt token list must not be empty", param="prompt")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of is not supported (it must equal n)", param="best_of")
        return items

    def params(self) -> SamplingParams:
        return self.sampling_params(max_tokens_default=16, logprobs=self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def params(self, *, max_tokens_default: int) -> SamplingParams:
        """``max_tokens_default``: what is left of the context after the prompt, as OpenAI does for chat."""
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequestError("only response_format type 'text' is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens_default=max(1, max_tokens_default), logprobs=lp)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---------------------------------------------------------------------------------------------------- responses
FinishReason = Literal["stop", "length", "abort"]


def finish_reason(reason: str | None) -> FinishReason | None:
    """An output's finish reason as clients see it: never "error" (an output that failed is raised instead)."""
    return cast("FinishReason | None", reason)


def _omit_none() -> Any:
    """A field left out of the JSON when None (stream deltas and usage are absent, not null, as OpenAI sends)."""
    return Field(None, exclude_if=lambda v: v is None)


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
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


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


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatDelta(BaseModel):
    """What a streamed chat chunk adds: the role on the first chunk, then content; empty on the finishing chunk."""

    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatStreamChoice(BaseModel):
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
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class WorkerHealth(BaseModel):
    worker: int
    ok: bool
    error: str | None = _omit_none()


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    workers: list[WorkerHealth] | None = _omit_none()
    error: str | None = _omit_none()


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    """A response model as JSON (serialized once, by pydantic)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")
