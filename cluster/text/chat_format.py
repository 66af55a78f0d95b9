"""OpenAI-shaped chat messages and tools, encoded token for token as ``mistral-common`` encodes them.

:func:`encode_mistral_chat` turns the OpenAI request fields (``messages``, ``tools``) into ``mistral-common``'s
request types and returns ``MistralTokenizer.encode_chat_completion(...).tokens``. Everything a client can get wrong
becomes a :class:`~cluster.errors.ChatFormatError` naming the request field (``"messages"`` or ``"tools"``) with a
message that says which message is at fault; no ``mistral-common`` exception escapes.

Accepted shapes (the OpenAI chat API):

* ``{"role": "system" | "developer" | "user", "content": str | [{"type": "text", "text": str}, ...]}``
* ``{"role": "assistant", "content": ... | None, "tool_calls": [{"id": str, "type": "function",
  "function": {"name": str, "arguments": str (JSON) | object}}]}``
* ``{"role": "tool", "tool_call_id": str, "content": ...}`` right after the assistant message that made the call.
* ``tools``: ``[{"type": "function", "function": {"name": str, "description": str, "parameters": object}}]``

The v1 tokenizer (Mixtral-8x7B) has no tools and keeps mixserve's strict v1 structure: an optional leading system
message, then user and assistant strictly alternating, ending with user. ``mistral-common``'s v1 instruct tokenizer
refuses tool definitions, assistant ``tool_calls`` and tool results (``TokenizerException: Tools not implemented for
tokenizer V1``), so on v1 they are a ChatFormatError (``param="tools"`` for tool definitions, ``"messages"`` for a
message with ``tool_calls`` or role ``tool``) whose message says so. Later versions accept every order that
``mistral-common`` accepts. Tool-call ids that ``mistral-common`` would refuse for v3+ (it wants exactly nine
letters or digits; OpenAI clients send ``call_...``) are mapped to nine alphanumerics derived from the id, the same
on the assistant call and on the tool result, so the pair still matches.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mistral_common.exceptions import InvalidToolException, InvalidToolSchemaException, MistralCommonException
from mistral_common.protocol.instruct.chunk import ContentChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ChatMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import ValidationError

from cluster.errors import ChatFormatError
from cluster.text.chat_template import ChatOptions

__all__ = ["encode_mistral_chat", "mistral_call_id"]

_ROLES = ("system", "developer", "user", "assistant", "tool")
_NO_CALL_IDS = (TokenizerVersion.v1, TokenizerVersion.v2)  # versions that encode no tool-call ids
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Why a v1 conversation cannot carry tool calls or tool results, and what to do instead.
_V1_NO_TOOLS = (
    "this model's chat format (Mistral tokenizer v1, as Mixtral-8x7B's) has no tool calls or tool results: "
    "mistral-common's v1 tokenizer refuses them ('Tools not implemented for tokenizer V1'); send earlier calls and "
    "their results as plain user / assistant text, or use a model with a v2+ tokenizer"
)

Content = str | list[ContentChunk]


def encode_mistral_chat(
    mistral: MistralTokenizer, messages: Any, tools: Any = None, options: ChatOptions | None = None
) -> list[int]:
    """Return ``mistral.encode_chat_completion(ChatCompletionRequest(messages, tools)).tokens`` for OpenAI input.

    ``options``: continue_final_message leaves the final (assistant) message open, as mistral-common's
    ``AssistantMessage(prefix=True)``; add_generation_prompt, documents and template variables have no place in a
    Mistral format (the prompt always ends where the assistant begins) and no effect.

    Raises:
        ChatFormatError: ``param="tools"`` for a bad tool list (or tools on v1, which has none), else
            ``param="messages"``.
    """
    version = mistral.instruct_tokenizer.tokenizer.version
    options = options or ChatOptions()
    try:
        request_tools = _convert_tools(tools, version)
        request_messages = _convert_messages(messages, version, open_end=options.continue_final_message)
        options.check(messages)
        if options.continue_final_message:
            request_messages[-1] = request_messages[-1].model_copy(update={"prefix": True})
        request = ChatCompletionRequest(messages=request_messages, tools=request_tools)
        return list(mistral.encode_chat_completion(request).tokens)
    except ChatFormatError:
        raise
    except (MistralCommonException, ValidationError, ValueError, AssertionError, TypeError) as err:
        param = "tools" if isinstance(err, (InvalidToolException, InvalidToolSchemaException)) else "messages"
        raise ChatFormatError(
            f"the {param} do not fit this model's chat format (Mistral tokenizer {version.value}): {_reason(err)}",
            param=param,
        ) from err


def mistral_call_id(call_id: str) -> str:
    """``call_id`` itself when it is nine letters or digits, else nine base-62 digits of its SHA-256."""
    if _CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(digits)


def _reason(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return str(err) or type(err).__name__


# --------------------------------------------------------------------------- tools


def _convert_tools(tools: Any, version: TokenizerVersion) -> list[Tool] | None:
    if tools is None or (isinstance(tools, Sequence) and not isinstance(tools, str) and len(tools) == 0):
        return None
    if version == TokenizerVersion.v1:
        raise ChatFormatError("this model's chat format (Mistral tokenizer v1) does not support tools", param="tools")
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise ChatFormatError(f"tools must be a list of tools, got {type(tools).__name__}", param="tools")
    converted = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "function") != "function"
            or not isinstance(function, Mapping)
        ):
            raise ChatFormatError(
                f"tools[{index}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                param="tools",
            )
        name, parameters = function.get("name"), function.get("parameters")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"tools[{index}]: the function needs a non-empty string 'name'", param="tools")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ChatFormatError(f"tools[{index}]: 'parameters' must be a JSON schema object", param="tools")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ChatFormatError(f"tools[{index}]: 'description' must be a string", param="tools")
        try:
            converted.append(Tool.from_openai({"type": "function", "function": dict(function)}))
        except ValidationError as err:
            raise ChatFormatError(f"tools[{index}]: {_reason(err)}", param="tools") from err
    return converted


# --------------------------------------------------------------------------- messages


def _convert_messages(messages: Any, version: TokenizerVersion, *, open_end: bool = False) -> list[ChatMessage]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError(f"messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages is empty: the conversation needs at least one user message")
    v1 = version == TokenizerVersion.v1
    converted: list[ChatMessage] = []
    pending: dict[str, str] | None = None  # the last assistant's call ids (client id -> encoded id), until a turn
    pending_from = -1
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"message {index}: expected a mapping with 'role' and 'content'")
        role = message.get("role")
        if role not in _ROLES:
            raise ChatFormatError(f"message {index}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        if role == "tool" and v1:
            raise ChatFormatError(f"message {index}: a tool result (role 'tool'): {_V1_NO_TOOLS}")
        if role == "tool":
            if pending is None:
                raise ChatFormatError(
                    f"message {index}: a tool message must follow an assistant message with tool_calls"
                )
            converted.append(_tool(index, message, pending, pending_from))
        elif role == "assistant":
            assistant, pending = _assistant(index, message, version)
            pending_from = index
            converted.append(assistant)
        else:
            pending = None
            content = _content(index, message.get("content"))
            converted.append(UserMessage(content=content) if role == "user" else SystemMessage(content=content))
    if v1:
        _check_v1_structure(len(messages), converted, open_end=open_end)
    return converted


def _content(index: int, content: Any) -> Content:
    """A string, or OpenAI text parts as ``mistral-common`` text chunks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        chunks: list[ContentChunk] = []
        for k, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatFormatError(
                    f"message {index}: content must be a string, got list (a list is accepted as text parts "
                    f'{{"type": "text", "text": ...}} only; part {k} is {kind!r})'
                )
            chunks.append(TextChunk(text=part["text"]))
        return chunks if chunks else ""
    raise ChatFormatError(f"message {index}: content must be a string, got {type(content).__name__}")


def _text(content: Any) -> str:
    """The text of a converted content (``None`` for an assistant that only calls tools)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(chunk.text for chunk in content if isinstance(chunk, TextChunk))


def _assistant(
    index: int, message: Mapping[str, Any], version: TokenizerVersion
) -> tuple[AssistantMessage, dict[str, str] | None]:
    """The message, and its calls' ids (client id -> encoded id) when it makes tool calls."""
    raw_calls = message.get("tool_calls")
    if raw_calls is None or (isinstance(raw_calls, list) and not raw_calls):
        return AssistantMessage(content=_content(index, message.get("content"))), None
    if version == TokenizerVersion.v1:
        raise ChatFormatError(f"message {index}: an assistant message with tool_calls: {_V1_NO_TOOLS}")
    if not isinstance(raw_calls, list):
        raise ChatFormatError(f"message {index}: tool_calls must be a list, got {type(raw_calls).__name__}")
    ids: dict[str, str] = {}
    calls = []
    for k, raw in enumerate(raw_calls):
        client_id, call = _tool_call(index, k, raw, version)
        ids[client_id] = call.id
        calls.append(call)
    content = message.get("content")
    converted = None if content is None or content == "" else _content(index, content)
    return AssistantMessage(content=converted, tool_calls=calls), ids


def _tool_call(index: int, k: int, call: Any, version: TokenizerVersion) -> tuple[str, ToolCall]:
    where = f"message {index}: tool_calls[{k}]"
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(call, Mapping) or not isinstance(function, Mapping):
        raise ChatFormatError(f"{where}: expected {{'id': ..., 'type': 'function', 'function': {{...}}}}")
    name, arguments, call_id = function.get("name"), function.get("arguments"), call.get("id")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}: the function needs a non-empty string 'name'")
    if isinstance(arguments, Mapping):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise ChatFormatError(f"{where}: 'arguments' must be a JSON string, got {type(arguments).__name__}")
    if not isinstance(call_id, str) or not call_id:
        raise ChatFormatError(f"{where}: needs a non-empty string 'id'")
    encoded_id = mistral_call_id(call_id) if version not in _NO_CALL_IDS else call_id
    return call_id, ToolCall(id=encoded_id, function=FunctionCall(name=name, arguments=arguments))


def _tool(index: int, message: Mapping[str, Any], pending: dict[str, str], pending_from: int) -> ToolMessage:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise ChatFormatError(f"message {index}: a tool message needs a non-empty string 'tool_call_id'")
    if call_id not in pending:
        raise ChatFormatError(
            f"message {index}: tool_call_id {call_id!r} matches no tool call of message {pending_from}"
        )
    name = message.get("name")
    return ToolMessage(
        content=_content(index, message.get("content")),
        tool_call_id=pending[call_id],
        name=name if isinstance(name, str) else None,
    )


def _check_v1_structure(count: int, converted: list[ChatMessage], *, open_end: bool = False) -> None:
    """Mixserve's v1 rules: optional system first, then user/assistant alternating, starting and ending with user
    (``open_end``: ending with the assistant message the model continues)."""
    expected = "user"
    seen_user = False
    for index, message in enumerate(converted):
        role = str(message.role)
        if role == "system":
            if index != 0:
                raise ChatFormatError(f"message {index}: a system message is only allowed as the first message")
            continue
        if role != expected:
            raise ChatFormatError(
                f"message {index}: expected role {expected!r} but got {role!r} "
                "(after an optional system message, user and assistant messages must alternate, starting with user)"
            )
        if isinstance(message, AssistantMessage) and not _text(message.content):
            raise ChatFormatError(f"message {index}: assistant message has empty content")
        seen_user = seen_user or role == "user"
        expected = "assistant" if role == "user" else "user"
    if not seen_user:
        raise ChatFormatError("the conversation has no user message")
    if expected == "user" and not open_end:
        raise ChatFormatError(
            f"message {count - 1}: the conversation must end with a user message, not an assistant message"
        )
