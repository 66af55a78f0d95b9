"""vLLM's extensions of the OpenAI request bodies (``vllm/entrypoints/openai/protocol.py``), with vLLM's meaning.

:class:`VllmExtras` (completions and chat) carries the sampling and request extras into
:class:`~cluster.engine.sampling.SamplingParams` (include_stop_str_in_output, skip_special_tokens,
spaces_between_special_tokens, truncate_prompt_tokens, prompt_logprobs, allowed_token_ids, bad_words, cache_salt,
return_routed_experts),
says how the response reports tokens (return_tokens_as_token_ids) and which id it carries (request_id), and
refuses by name only what this server cannot honour: a ``priority`` other than 0 (the engine schedules first come,
first served, as a vLLM server without priority scheduling refuses it), ``use_beam_search: true``, prompt logprobs
while streaming (as vLLM). ``length_penalty`` only weighs beam search candidates: without beam search it has no
effect, as in vLLM. :class:`StructuredOutputsIn` is vLLM's ``structured_outputs`` (its current name for guided
decoding). :class:`ChatExtras` are the chat-only ones: the chat template's options and vLLM's chat ``echo``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from cluster.engine.sampling import StructuredOutput
from cluster.errors import InvalidRequestError
from cluster.text.chat_template import ChatOptions

Number = StrictInt | float
MAX_REQUEST_ID_CHARS = 256


class Strict(BaseModel):
    """A request body part: a field that is not declared is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")


class StructuredOutputsIn(Strict):
    """vLLM's ``structured_outputs``: exactly one of json, regex, choice, grammar, json_object."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (or its text)")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect)")
    json_object: StrictBool | None = None
    structural_tag: str | None = Field(None, description="not supported: a 400")
    disable_fallback: StrictBool = Field(False, description="accepted: there is one backend (llguidance), no fallback")
    disable_any_whitespace: StrictBool = Field(False, description="accepted: JSON has no free whitespace here")
    disable_additional_properties: StrictBool = Field(False, description="only false")
    whitespace_pattern: str | None = Field(None, description="not supported: a 400")

    def output(self) -> tuple[StructuredOutput | None, dict[str, Any] | str | None]:
        """(the constraint, or None for a JSON schema given as ``json`` (returned second)); a 400 naming
        ``structured_outputs`` unless exactly one constraint is given, or for what is not supported."""
        for name in ("structural_tag", "whitespace_pattern"):
            if getattr(self, name) is not None:
                raise InvalidRequestError(f"structured_outputs.{name} is not supported", param="structured_outputs")
        if self.disable_additional_properties:
            raise InvalidRequestError(
                "structured_outputs.disable_additional_properties is not supported; set additionalProperties: false "
                "in the schema",
                param="structured_outputs",
            )
        given = [
            n for n in ("json_schema", "regex", "choice", "grammar", "json_object") if getattr(self, n) is not None
        ]
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured_outputs takes exactly one of json, regex, choice, grammar, json_object; got {len(given)}",
                param="structured_outputs",
            )
        if self.json_schema is not None:
            return None, self.json_schema
        if self.regex is not None:
            return StructuredOutput("regex", self.regex), None
        if self.choice is not None:
            return StructuredOutput("choice", json.dumps(self.choice)), None
        if self.grammar is not None:
            return StructuredOutput("lark", self.grammar), None
        if not self.json_object:
            raise InvalidRequestError("structured_outputs.json_object must be true if set", param="structured_outputs")
        return StructuredOutput("json_object"), None


class VllmExtras(Strict):
    """The extras of completions and chat completions (see the module docstring)."""

    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    truncate_prompt_tokens: StrictInt | None = Field(None, description="keep the last k prompt tokens (-1: context)")
    prompt_logprobs: StrictInt | None = Field(None, description="top alternatives per prompt token (0..20)")
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: StrictBool | None = Field(None, description="logprobs name tokens 'token_id:<id>'")
    priority: StrictInt = Field(0, description="only 0: the engine schedules first come, first served")
    request_id: str | None = Field(
        None, min_length=1, max_length=MAX_REQUEST_ID_CHARS, description="the response id is <prefix>-<request_id>"
    )
    cache_salt: str | None = Field(None, description="only requests with the same salt share prefix-cache blocks")
    structured_outputs: StructuredOutputsIn | None = None
    length_penalty: Number = Field(1.0, description="beam search only: no effect")
    use_beam_search: StrictBool = Field(False, description="only false")
    return_routed_experts: StrictBool = Field(
        False, description="each choice reports the experts every token was routed to (routed_experts)"
    )

    def extra_params(self, *, streaming: bool) -> dict[str, Any]:
        """The SamplingParams fields these extras set; a 400 naming what cannot be honoured."""
        if self.priority != 0:
            raise InvalidRequestError(
                "priority: this server schedules first come, first served; only priority 0 is accepted",
                param="priority",
            )
        if self.use_beam_search:
            raise InvalidRequestError("beam search is not supported", param="use_beam_search")
        if self.prompt_logprobs is not None and streaming and self.prompt_logprobs > 0:
            raise InvalidRequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        if self.cache_salt is not None and not self.cache_salt:
            raise InvalidRequestError("cache_salt must be a non-empty string if given", param="cache_salt")
        return {
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "prompt_logprobs": self.prompt_logprobs,
            "allowed_token_ids": tuple(self.allowed_token_ids) if self.allowed_token_ids is not None else None,
            "bad_words": tuple(self.bad_words or ()),
            "cache_salt": self.cache_salt,
            "return_routed_experts": self.return_routed_experts,
        }

    def response_id(self, prefix: str, generated: str) -> str:
        """``<prefix>-<request_id>`` when the client named the request (as vLLM does), else ``generated``."""
        return f"{prefix}-{self.request_id}" if self.request_id is not None else generated

    def truncate(self, ids: list[int], context: int) -> list[int]:
        """The prompt's last ``truncate_prompt_tokens`` tokens (-1: the context); a 400 when that is more than the
        context holds (as vLLM)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k == -1:
            k = context
        if k < 1 or k > context:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be -1 or in [1, {context}] (the context length), got "
                f"{self.truncate_prompt_tokens}",
                param="truncate_prompt_tokens",
            )
        return ids[-k:]


class ChatTemplateOptions(Strict):
    """How the conversation is rendered (chat completions and /tokenize): vLLM's chat template fields."""

    add_generation_prompt: StrictBool | None = Field(
        None, description="default: true unless continue_final_message (a Mistral format always has one)"
    )
    continue_final_message: StrictBool = Field(False, description="the model continues the final assistant message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="variables of a chat template")
    documents: list[dict[str, str]] | None = Field(None, description="documents a chat template may read (RAG)")

    def chat_options(self) -> ChatOptions:
        """The rendering options; chat_template_kwargs may set add_generation_prompt, continue_final_message and
        documents too (vLLM merges them over the request's own)."""
        kwargs = dict(self.chat_template_kwargs or {})
        add = kwargs.pop("add_generation_prompt", self.add_generation_prompt)
        cont = kwargs.pop("continue_final_message", self.continue_final_message)
        documents = kwargs.pop("documents", self.documents)
        if not isinstance(add, bool | None) or not isinstance(cont, bool):
            raise InvalidRequestError(
                "chat_template_kwargs: add_generation_prompt and continue_final_message are true or false",
                param="chat_template_kwargs",
            )
        if add and cont:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
            )
        return ChatOptions(
            add_generation_prompt=not cont if add is None else add,
            continue_final_message=cont,
            documents=tuple(documents) if documents is not None else None,
            template_kwargs=kwargs or None,
        )


class ChatExtras(ChatTemplateOptions):
    """vLLM's chat-only extras: the template options, ``echo`` and OpenAI's ``prediction`` (null only)."""

    echo: StrictBool = Field(
        False, description="the reply starts with the final message's content when it is the assistant's"
    )
    prediction: None = Field(None, description="only null: predicted outputs are not supported")

    @field_validator("prediction", mode="before")
    @classmethod
    def _no_prediction(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("predicted outputs are not supported; leave prediction out or null")
        return value

    def echoed(self, messages: list[Any]) -> str:
        """What ``echo`` puts before the reply: the final message's text when it is an assistant's (vLLM)."""
        last = messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        return last.text() or ""
