"""The OpenAI-compatible request bodies as pydantic models, and their translation to :class:`SamplingParams`.

Requests are strict: a field that is not declared here is a 400 naming it (:func:`cluster.serve.body.validation_error`).
Declared fields either work or are refused with a 400 naming them. A few OpenAI fields are accepted and have no
effect here (:data:`NO_EFFECT`, listed in the README). Request problems raise
:class:`~cluster.errors.InvalidRequestError` (or a subclass) with ``param`` naming the field (HTTP 400).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from cluster.errors import InvalidRequestError
from cluster.sampling import SamplingParams

Number = StrictInt | float

# OpenAI fields accepted and ignored: they change nothing about what this server generates.
NO_EFFECT = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
    "modalities",
    "stream_options.include_obfuscation",
    "messages[].name",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = Field(None, description="accepted, no effect (no obfuscation padding)")


class _Sampling(_Strict):
    """Fields shared by completions and chat completions: OpenAI's, plus vLLM's sampling extras."""

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = Field(None, description="token id (a string key) -> bias in [-100, 100]")
    user: str | None = Field(None, description="accepted, no effect")
    # vLLM's extras
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None

    def sampling_params(self, *, max_tokens_default: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        """SamplingParamsError (a 400 naming the parameter) when a value is out of range."""
        if not 1 <= self.n <= 16:
            raise InvalidRequestError("n must be between 1 and 16", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
                raise InvalidRequestError(
                    f"logit_bias: the keys must be token ids in [0, {vocab_size}), got {key[:20]!r}", param="logit_bias"
                )
            bias.append((int(key), value))
        max_tokens = self.max_tokens if self.max_tokens is not None else max_tokens_default

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=given(self.temperature, 1.0),
            top_p=given(self.top_p, 1.0),
            top_k=given(self.top_k, -1),
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            min_p=given(self.min_p, 0.0),
            min_tokens=given(self.min_tokens, 0),
            logit_bias=tuple(bias),
        )


class CompletionRequest(_Sampling):
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
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs (the prompt's logprobs) is not supported yet; drop one of them", param="echo"
            )
        return items

    def params(self, *, vocab_size: int) -> SamplingParams:
        return self.sampling_params(max_tokens_default=16, logprobs=self.logprobs, vocab_size=vocab_size)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content parts of type {data.get('type')!r} are not supported; only 'text'")
        return data


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is taken as system")
    content: str | list[ContentPart]
    name: str | None = Field(None, description="accepted, no effect (the chat format has no participant names)")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def as_chat(messages: list[ChatMessageIn]) -> list[dict[str, str]]:
    """The messages as the tokenizer's chat encoder takes them (``developer`` is a system message)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="not supported yet: only absent or empty")
    tool_choice: str | dict[str, Any] | None = Field(None, description="not supported yet: only absent or 'none'")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} for now")
    # accepted, no effect
    parallel_tool_calls: StrictBool | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[Literal["text"]] | None = None

    def params(self, *, max_tokens_default: int, vocab_size: int) -> SamplingParams:
        """``max_tokens_default``: what is left of the context after the prompt, as OpenAI does for chat."""
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server yet", param="tools")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequestError(
                "tool_choice is not supported by this server yet (only 'none')", param="tool_choice"
            )
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequestError("only response_format type 'text' is supported yet", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens_default=max(1, max_tokens_default), logprobs=lp, vocab_size=vocab_size)

    def chat(self) -> list[dict[str, str]]:
        return as_chat(self.messages)


class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = Field(True, description="add BOS in front, as completions do")
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Strict):
    """vLLM's /tokenize with chat messages (the ids a chat completion would be prompted with)."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    add_generation_prompt: StrictBool = Field(
        True, description="only true: the Mistral instruct format always ends with the generation prompt [/INST]"
    )
    return_token_strs: StrictBool = False

    def chat(self) -> list[dict[str, str]]:
        return as_chat(self.messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[StrictInt]
