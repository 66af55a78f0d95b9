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
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.errors import ChatFormatError, SetupError

__all__ = ["ChatTemplate", "SPECIAL_TOKEN_KEYS"]

#: The named special tokens transformers hands every template (``special_tokens_map``).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
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

    def render(self, messages: Any, *, tools: Any = None, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (and ``tools``), as ``apply_chat_template(..., tokenize=False)``.

        Raises:
            ChatFormatError: The messages or tools have the wrong shape, the template refuses them
                (``raise_exception``) or fails on them.
        """
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise ChatFormatError(f"messages must be a list of messages, got {type(messages).__name__}")
        if not messages:
            raise ChatFormatError("messages is empty: the conversation needs at least one user message")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
            raise ChatFormatError("tools must be a list of tool objects", param="tools")
        tools = tools or None
        name = self._pick(tools is not None)
        if tools is not None and not self.supports_tools:
            raise ChatFormatError("this model's chat template does not support tools", param="tools")
        flatten = not _LOOPS_OVER_CONTENT.search(self.sources[name])
        chat = [self._message(index, message, flatten) for index, message in enumerate(messages)]
        context = {
            **self.special_tokens,
            "messages": chat,
            "tools": _plain(tools),
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled[name].render(**context)
        except jinja2.TemplateError as err:
            raise ChatFormatError(f"the model's chat template refused the messages: {err}") from err
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise ChatFormatError(f"the model's chat template failed on the messages: {err!r}") from err

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
