"""The OpenAI-compatible request bodies as pydantic models, and their translation to :class:`SamplingParams`.

Requests are strict: a field that is not declared here is a 400 naming it
(:func:`cluster.serve.ingress.body.validation_error`). Declared fields either work or are refused with a 400 naming
them. A few OpenAI fields are accepted and have no effect here (:data:`NO_EFFECT`, listed in the README). Request
problems raise
:class:`~cluster.errors.InvalidRequestError` (or a subclass) with ``param`` naming the field (HTTP 400).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, StrictInt, Tag, model_validator

from cluster.engine.sampling import SamplingParams, StructuredOutput
from cluster.errors import InvalidRequestError
from cluster.serve.ingress.openai_api.extras import ChatExtras, ChatTemplateOptions, VllmExtras
from cluster.serve.ingress.openai_api.extras import Strict as _Strict

Number = StrictInt | float

# OpenAI fields accepted and ignored: they change nothing about what this server generates.
NO_EFFECT = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "modalities",
    "stream_options.include_obfuscation",
    "messages[].name",  # but on a tool message (the v2 chat format writes it with the result)
    "response_format.json_schema.strict",  # outputs always follow their schema
    "tools[].function.strict",
    "length_penalty",  # weighs beam search candidates only (vLLM), and use_beam_search is false here
    "structured_outputs.disable_fallback",  # one backend, no fallback
    "structured_outputs.disable_any_whitespace",  # JSON has no free whitespace here anyway
)


class StreamOptions(_Strict):
    include_usage: StrictBool | None = Field(None, description="a last chunk with the usage (default: as continuous)")
    continuous_usage_stats: StrictBool = Field(False, description="vLLM's: the usage so far in every chunk")
    include_obfuscation: StrictBool | None = Field(None, description="accepted, no effect (no obfuscation padding)")

    @property
    def usage_at_end(self) -> bool:
        return self.include_usage if self.include_usage is not None else self.continuous_usage_stats

    @property
    def continuous(self) -> bool:
        """Usage in every chunk: continuous_usage_stats, unless include_usage is false (vLLM's rule)."""
        return self.continuous_usage_stats and self.usage_at_end


def usage_flags(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a last usage chunk, usage in every chunk) of a streamed request."""
    return (options.usage_at_end, options.continuous) if options is not None else (False, False)


class JsonSchemaFormat(_Strict):
    name: str = Field(description="the schema's name (not used to generate)")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="the JSON schema every output validates against")
    strict: StrictBool | None = Field(None, description="accepted; outputs always follow the schema strictly")


class ResponseFormat(_Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("a json_schema object goes with type 'json_schema', and only with it")
        return self


class _Sampling(VllmExtras):
    """Fields shared by completions and chat completions: OpenAI's, plus vLLM's sampling extras (and the request
    extras of :class:`~cluster.serve.ingress.openai_api.extras.VllmExtras`)."""

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
    # structured output: OpenAI's response_format and vLLM's guided_* (at most one; see .structured)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema (an object or its JSON text)")
    guided_regex: str | None = Field(None, description="a regular expression the whole output matches")
    guided_choice: list[str] | None = Field(None, description="the output is exactly one of these strings")
    guided_grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect)")

    def sampling_params(
        self,
        *,
        max_tokens_default: int,
        logprobs: int | None,
        vocab_size: int,
        structured: StructuredOutput | None = None,
        best_of: int | None = None,
    ) -> SamplingParams:
        """SamplingParamsError (a 400 naming the parameter) when a value is out of range (n and best_of too: one
        limit, ``SamplingParams``'). ``structured``: the constraint
        :func:`cluster.serve.ingress.openai_api.structured.request_constraint` chose for the request."""
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
            structured_output=structured,
            n=self.n,
            best_of=best_of,
            **self.extra_params(streaming=self.stream),
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
        if self.best_of is not None and self.stream and self.best_of > self.n:
            raise InvalidRequestError(
                "best_of cannot be used with stream (the best are known at the end)", param="best_of"
            )
        return items

    def params(self, *, vocab_size: int, structured: StructuredOutput | None = None) -> SamplingParams:
        """With echo and logprobs, the prompt's tokens are scored too; n and best_of are the fan-out's
        (``cluster.engine.fanout``)."""
        params = self.sampling_params(
            max_tokens_default=16,
            logprobs=self.logprobs,
            vocab_size=vocab_size,
            structured=structured,
            best_of=self.best_of,
        )
        if self.echo and self.logprobs is not None:  # scored as well: as many alternatives as either wants
            params = dataclasses.replace(params, prompt_logprobs=max(self.logprobs, self.prompt_logprobs or 0))
        return params


class ContentPart(_Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content parts of type {data.get('type')!r} are not supported; only 'text'")
        return data


class FunctionCallIn(_Strict):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCallIn(_Strict):
    """A tool call of an earlier assistant message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is taken as system; tool is the result of an assistant's tool call"
    )
    content: str | list[ContentPart] | None = Field(None, description="optional only for an assistant calling tools")
    name: str | None = Field(
        None, description="no effect (the chat format has no participant names), but on a tool message: the function"
    )
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant messages only")
    tool_call_id: str | None = Field(None, description="tool messages only: the id of the call answered")

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message (and only a tool message) has a tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be left out only by an assistant message with tool_calls)")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as the tokenizer's chat encoder takes it (``developer`` is a system message)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name is not None:  # the v2 format writes it with the result
                out["name"] = self.name
        return out


def as_chat(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """The messages as the tokenizer's chat encoder takes them."""
    return [m.as_dict() for m in messages]


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: StrictBool | None = Field(None, description="accepted; constrained calls always follow the schema")


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


# Tagged "str" / "dict" (tags the 400's param leaves out): errors name tool_choice or tool_choice.function.name.
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")] | Annotated[NamedToolChoice, Tag("dict")],
    Discriminator(lambda v: "str" if isinstance(v, str) else "dict"),
]


class ChatCompletionRequest(ChatExtras, _Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = Field(
        None, description="default: auto with tools, none without (cluster.serve.ingress.openai_api.tools)"
    )
    parallel_tool_calls: StrictBool | None = Field(
        None, description="false: tool_choice required makes exactly one call; no effect on auto"
    )
    # accepted, no effect
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[Literal["text"]] | None = None

    def params(
        self, *, max_tokens_default: int, vocab_size: int, structured: StructuredOutput | None = None
    ) -> SamplingParams:
        """``max_tokens_default``: what is left of the context after the prompt, as OpenAI does for chat."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(
            max_tokens_default=max(1, max_tokens_default), logprobs=lp, vocab_size=vocab_size, structured=structured
        )

    def chat(self) -> list[dict[str, Any]]:
        return as_chat(self.messages)


class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = Field(True, description="add BOS in front, as completions do")
    return_token_strs: StrictBool = False


class TokenizeChatRequest(ChatTemplateOptions):
    """vLLM's /tokenize with chat messages (the ids a chat completion would be prompted with)."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    return_token_strs: StrictBool = False
    tools: list[ToolDef] | None = Field(None, description="tools rendered into the prompt, as chat completions do")

    def chat(self) -> list[dict[str, Any]]:
        return as_chat(self.messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[StrictInt]
