"""Hugging Face chat templates, rendered as transformers' ``apply_chat_template`` renders them.

A model folder without a Mistral tokenizer file carries its chat format as a jinja template: ``chat_template.jinja``
or the ``chat_template`` of ``tokenizer_config.json`` (one string, or named templates of which ``"tool_use"`` is
taken when tools are given and ``"default"`` otherwise). :class:`ChatTemplate` renders it the way transformers does:
an immutable sandboxed jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
the ``{% generation %}`` tag, transformers' ``tojson`` filter and its globals (``raise_exception``,
``strftime_now``, ``dict``, ``namespace``), the named special tokens (``bos_token``, ``eos_token``, ...), ``tools``,
``documents`` and ``add_generation_prompt``, with ``None``-valued message keys dropped first.

One deliberate difference: OpenAI clients may send a content as a list of text parts. A template that never loops
over a message's content would print that list as Python; unless the template iterates over the content, the parts
are joined into one string (separated by a blank line, as ``mistral-common`` joins them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.errors import ChatFormatError, SetupError

__all__ = ["ChatOptions", "ChatTemplate", "SPECIAL_TOKEN_KEYS"]

#: The named special tokens transformers hands every template (``special_tokens_map``).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where the final message's text ends
# Template variables chat_template_kwargs cannot set: the conversation and tools go through their own fields.
RESERVED_KWARGS = ("messages", "tools")


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation is rendered, as vLLM's chat request fields say (and transformers' apply_chat_template).

    add_generation_prompt   end with the template's generation prompt (a Mistral format always ends where the
                            assistant begins: no effect there)
    continue_final_message  the final message is an assistant message left open for the model to continue (no
                            end-of-turn after it); not together with add_generation_prompt
    documents               RAG documents (dicts of strings) a chat template may read; no effect on a Mistral format
    template_kwargs         extra variables a chat template may read (vLLM's chat_template_kwargs); no effect on a
                            Mistral format
    """

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: tuple[Mapping[str, str], ...] | None = None
    template_kwargs: Mapping[str, Any] | None = None

    def check(self, messages: Sequence[Any]) -> None:
        """ChatFormatError naming the field when the options cannot go together or with ``messages``."""
        if self.continue_final_message and self.add_generation_prompt:
            raise ChatFormatError(
                "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
            )
        last = messages[-1] if messages else None
        if self.continue_final_message and not (isinstance(last, Mapping) and last.get("role") == "assistant"):
            raise ChatFormatError(
                "continue_final_message: the final message must be an assistant message to continue",
                param="continue_final_message",
            )
        reserved = [k for k in RESERVED_KWARGS if k in (self.template_kwargs or {})]
        if reserved:
            raise ChatFormatError(
                f"chat_template_kwargs: {reserved[0]!r} is set by the request's own field", param="chat_template_kwargs"
            )


_LOOPS_OVER_CONTENT = re.compile(r"""\bfor\s+\w+\s+in\s+\w+\s*(\[\s*['"]content['"]\s*\]|\.content\b)""")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` refusing underscore-prefixed attributes, as transformers does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant tokens): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """JSON-like data only (what transformers lets a template see); other objects become ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) carry methods the sandbox does not know
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One model's chat template(s).

    Args:
        templates: The template source, or named sources (``"default"``, ``"tool_use"``, ...).
        special_tokens: The named special tokens (``{"bos_token": "<s>", ...}``) the template sees.
        where: Where the template comes from, for error messages.

    Raises:
        SetupError: A template does not compile.
    """

    def __init__(
        self, templates: str | Mapping[str, str], special_tokens: Mapping[str, str], *, where: str = "chat template"
    ) -> None:
        named = {"default": templates} if isinstance(templates, str) else dict(templates)
        env = _environment()
        self._compiled: dict[str, jinja2.Template] = {}
        for name, source in named.items():
            try:
                self._compiled[name] = env.from_string(source)
            except jinja2.TemplateError as err:
                raise SetupError(f"{where}: the chat template {name!r} does not compile: {err}") from err
        if len(named) != 1 and "default" not in named:
            raise SetupError(f"{where}: several chat templates and none is named 'default'")
        self.sources = named
        self.special_tokens = dict(special_tokens)

    @property
    def supports_tools(self) -> bool:
        """Whether the template used for a request with tools reads ``tools`` at all."""
        return "tools" in self.sources[self._pick(with_tools=True)]

    def _pick(self, with_tools: bool) -> str:
        if with_tools and "tool_use" in self.sources:
            return "tool_use"
        return "default" if "default" in self.sources else next(iter(self.sources))

    def render(self, messages: Any, *, tools: Any = None, options: ChatOptions | None = None) -> str:
        """The prompt text for ``messages`` (and ``tools``), as ``apply_chat_template(..., tokenize=False)`` with the
        ``options`` (add_generation_prompt, continue_final_message, documents, extra template variables).

        Raises:
            ChatFormatError: The messages or tools have the wrong shape, the template refuses them
                (``raise_exception``) or fails on them.
        """
        options = options or ChatOptions()
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise ChatFormatError(f"messages must be a list of messages, got {type(messages).__name__}")
        if not messages:
            raise ChatFormatError("messages is empty: the conversation needs at least one user message")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
            raise ChatFormatError("tools must be a list of tool objects", param="tools")
        options.check(messages)
        tools = tools or None
        name = self._pick(tools is not None)
        if tools is not None and not self.supports_tools:
            raise ChatFormatError("this model's chat template does not support tools", param="tools")
        flatten = not _LOOPS_OVER_CONTENT.search(self.sources[name])
        chat = [self._message(index, message, flatten) for index, message in enumerate(messages)]
        final = self._tag_final(chat) if options.continue_final_message else None
        context = {
            **self.special_tokens,
            **_plain(dict(options.template_kwargs or {})),
            "messages": chat,
            "tools": _plain(tools),
            "documents": _plain(list(options.documents)) if options.documents is not None else None,
            "add_generation_prompt": options.add_generation_prompt,
        }
        try:
            text = self._compiled[name].render(**context)
        except jinja2.TemplateError as err:
            raise ChatFormatError(f"the model's chat template refused the messages: {err}") from err
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise ChatFormatError(f"the model's chat template failed on the messages: {err!r}") from err
        return text if final is None else self._cut_at_tag(text, final)

    @staticmethod
    def _tag_final(chat: list[dict[str, Any]]) -> str:
        """Mark the end of the final message's text (transformers' continue_final_message); returns that text."""
        content = chat[-1].get("content")
        if isinstance(content, list):  # text parts the template loops over: the last one is continued
            part = next((p for p in reversed(content) if isinstance(p, dict) and "text" in p), None)
            if part is None:
                raise ChatFormatError("continue_final_message: the final message has no text", param="messages")
            text, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
            return text
        if not isinstance(content, str):
            raise ChatFormatError("continue_final_message: the final message has no content", param="messages")
        chat[-1]["content"] = content + _CONTINUE_TAG
        return content

    @staticmethod
    def _cut_at_tag(text: str, final: str) -> str:
        """The rendered text up to where the final message's text ends (as transformers cuts it)."""
        if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ChatFormatError(
                "continue_final_message: the model's chat template does not write the final message as given",
                param="continue_final_message",
            )
        at = text.rindex(_CONTINUE_TAG.strip())
        return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    @staticmethod
    def _message(index: int, message: Any, flatten: bool) -> dict[str, Any]:
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"message {index}: expected a mapping with 'role' and 'content'")
        if not isinstance(message.get("role"), str):
            raise ChatFormatError(f"message {index}: role must be a string, got {type(message.get('role')).__name__}")
        plain: dict[str, Any] = _plain({k: v for k, v in message.items() if v is not None})
        content = plain.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatFormatError(
                        f"message {index}: content must be a string, got list (a list is accepted as text parts "
                        f'{{"type": "text", "text": ...}} only; part {k} is {kind!r})'
                    )
            if flatten:
                plain["content"] = "\n\n".join(part["text"] for part in content)
        reasoning = next((plain[key] for key in _REASONING_FIELDS if plain.get(key) is not None), None)
        if reasoning is not None:  # transformers aliases the reasoning fields for templates that read another name
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        return plain
