"""OpenAI-compatible request models and the translation to our SamplingParams.

Validation errors become HTTP 400 in the OpenAI error shape with ``param`` naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from cluster.errors import InvalidRequestError
from cluster.sampling import SamplingParams, SamplingParamsError

Number = StrictInt | float


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
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                seed=self.seed,
                stop=self.stop or (),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
            )
        except SamplingParamsError as e:
            raise InvalidRequestError(str(e), param=e.param) from None


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
