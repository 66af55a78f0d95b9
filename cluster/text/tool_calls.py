"""Tool calls in a Mistral model's output, as OpenAI tool calls.

Mistral models call tools with the ``[TOOL_CALLS]`` control token, in the format of their tokenizer version (the
same formats ``mistral-common`` writes for assistant tool calls and reads back in ``experimental.tools``):

* v2 to v7: ``[TOOL_CALLS][{"name": "f", "arguments": {...}, "id": "..."}, ...]`` (a JSON list; ``id`` optional).
* v11 and later: ``[TOOL_CALLS]f[ARGS]{...}`` once per call, or ``[TOOL_CALLS]f[CALL_ID]abc123xyz[ARGS]{...}``.

Text before the first ``[TOOL_CALLS]`` is the message content. Output that does not parse (truncated JSON, no
name) is returned as plain content with no tool call, which is what a client would have seen without tools.

:func:`parse_tool_calls` works on text with the markers spelled out; :func:`parse_generated` on the generated ids
of a model (where the markers are control tokens that ``decode`` drops).
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.text.tokenizer import Tokenizer

__all__ = ["ARGS", "CALL_ID", "TOOL_CALLS", "ParsedOutput", "new_call_id", "parse_generated", "parse_tool_calls"]

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_MARKERS = (TOOL_CALLS, ARGS, CALL_ID)
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ParsedOutput:
    """A model's output split into content and OpenAI tool calls.

    Attributes:
        content: The text before the first tool call (all the text when there is none), unstripped.
        tool_calls: ``[{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}]``; empty
            when the output calls no tool.
    """

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def new_call_id() -> str:
    """A fresh tool-call id: nine random letters and digits, the form ``mistral-common`` wants back for v3+."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def parse_tool_calls(text: str, *, new_id: Callable[[], str] = new_call_id) -> ParsedOutput:
    """Split ``text`` (markers such as ``[TOOL_CALLS]`` spelled out) into content and tool calls.

    Args:
        text: The model's output with its control tokens written as text.
        new_id: Makes the id of a call the model gave none.
    """
    content, marker, rest = text.partition(TOOL_CALLS)
    if not marker:
        return ParsedOutput(text)
    calls: list[dict[str, Any]] = []
    for segment in rest.split(TOOL_CALLS):
        parsed = _segment_calls(segment, new_id)
        if parsed is None:
            return ParsedOutput(_without_markers(text))
        calls.extend(parsed)
    return ParsedOutput(content, calls) if calls else ParsedOutput(_without_markers(text))


def parse_generated(
    tokenizer: Tokenizer, token_ids: Sequence[int], *, new_id: Callable[[], str] = new_call_id
) -> ParsedOutput:
    """Split a model's generated ids into content and tool calls.

    The ids between control markers are decoded run by run (as ``mistral-common`` decodes a tool call), the
    markers written as text, and the result parsed by :func:`parse_tool_calls`. Without a tool call, or when it
    does not parse, the content is ``tokenizer.decode(token_ids)``, exactly the streamed text. A tokenizer whose
    vocabulary has no ``[TOOL_CALLS]`` control token is parsed on its decoded text.
    """
    ids = [int(i) for i in token_ids]
    marker_ids = {i: m for m in _MARKERS if (i := tokenizer.special_id(m)) is not None}
    if not any(i in marker_ids for i in ids):
        text = tokenizer.decode(ids)
        return parse_tool_calls(text, new_id=new_id) if TOOL_CALLS in text else ParsedOutput(text)
    parts: list[str] = []
    run: list[int] = []
    for token_id in ids:
        if token_id in marker_ids:
            parts += [tokenizer.decode(run), marker_ids[token_id]]
            run = []
        else:
            run.append(token_id)
    parts.append(tokenizer.decode(run))
    parsed = parse_tool_calls("".join(parts), new_id=new_id)
    return parsed if parsed.tool_calls else ParsedOutput(tokenizer.decode(ids))


def _without_markers(text: str) -> str:
    for marker in _MARKERS:
        text = text.replace(marker, "")
    return text


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _segment_calls(segment: str, new_id: Callable[[], str]) -> list[dict[str, Any]] | None:
    """The calls of the text after one ``[TOOL_CALLS]``, or ``None`` when it does not parse."""
    if ARGS in segment:  # v11+: name[ARGS]{...} or name[CALL_ID]id[ARGS]{...}
        head, _, arguments = segment.partition(ARGS)
        name, _, call_id = head.partition(CALL_ID)
        value = _json(arguments)
        if value is None or not name.strip():
            return None
        return [_openai_call(name.strip(), value, call_id.strip() or None, new_id)]
    value = _json(segment)  # v2..v7: a JSON list of {"name", "arguments", "id"?}
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            return None
        call_id = item.get("id")
        calls.append(
            _openai_call(name, item.get("arguments", {}), call_id if isinstance(call_id, str) else None, new_id)
        )
    return calls


def _openai_call(name: str, arguments: Any, call_id: str | None, new_id: Callable[[], str]) -> dict[str, Any]:
    return {
        "id": call_id if call_id and call_id != "null" else new_id(),
        "type": "function",
        "function": {
            "name": name,
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        },
    }
