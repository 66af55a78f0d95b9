"""Tools on chat completions, response side: a choice's output as an assistant message with content and tool calls,
whole (:func:`final_message`) or streamed (:class:`MessageStream`), the two always assembling into the same calls.

By :class:`~cluster.serve.ingress.openai_api.tools.ToolPlan` mode:

* ``none``: the text is the content.
* ``auto``: the model's native output is parsed by :func:`cluster.text.tool_calls.parse_generated`; with calls, the
  content is the text before ``[TOOL_CALLS]`` (None when blank). Streamed, content goes out as it comes until the
  ``[TOOL_CALLS]`` marker (the control token, or the text where the vocabulary has no such token; a partial marker
  at the end of the text is held back); after it nothing goes out until the output ends, then one delta per call
  (or, when the calls do not parse, the held-back text as content).
* ``required``: the output is a JSON array of ``{"name", "arguments"}``; each call complete in it is a tool call
  whose arguments are ``json.dumps(arguments, ensure_ascii=False)``. Streamed: one delta per call, as soon as it
  is complete (an output cut short keeps its complete calls).
* ``named``: the output is the arguments object of the named function. Streamed: the first delta has the id,
  type and name, every delta the new text of the arguments.

A message with calls finishes with ``tool_calls`` when the output ended on its own (``stop``); ``length`` stays
``length``. Tool-call ids come from :func:`cluster.text.tool_calls.new_call_id` (or the model's own, in its native
format).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cluster.engine.request import RequestOutput
from cluster.serve.ingress.openai_api.responses import (
    ChatDelta,
    ChatMessage,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    finish_reason,
)
from cluster.serve.ingress.openai_api.tools import ToolPlan
from cluster.text.tokenizer import Tokenizer
from cluster.text.tool_calls import TOOL_CALLS, new_call_id, parse_generated

_DECODER = json.JSONDecoder()
_BLANK = " \t\n\r"


def array_calls(text: str) -> list[tuple[str, str]]:
    """(name, arguments JSON) of each complete call in the JSON array ``text`` (possibly cut short) of
    ``{"name", "arguments"}`` objects: what ``tool_choice: required`` generates."""
    pos = len(text) - len(text.lstrip(_BLANK))
    if not text.startswith("[", pos):
        return []
    pos += 1
    calls: list[tuple[str, str]] = []
    while True:
        while pos < len(text) and text[pos] in _BLANK:
            pos += 1
        try:
            item, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return calls
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append((item["name"], json.dumps(item.get("arguments", {}), ensure_ascii=False)))
        while pos < len(text) and text[pos] in _BLANK:
            pos += 1
        if not text.startswith(",", pos):
            return calls
        pos += 1


def _tool_call(name: str, arguments: str, call_id: str | None = None) -> ToolCall:
    return ToolCall(id=call_id or new_call_id(), function=FunctionCall(name=name, arguments=arguments))


def _openai_calls(calls: Sequence[dict[str, Any]]) -> list[ToolCall]:
    return [_tool_call(c["function"]["name"], c["function"]["arguments"], c["id"]) for c in calls]


def _reason(reason: str | None, called: bool) -> FinishReason | None:
    return "tool_calls" if called and reason == "stop" else finish_reason(reason)


def final_message(plan: ToolPlan, tokenizer: Tokenizer, out: RequestOutput) -> tuple[ChatMessage, FinishReason | None]:
    """A finished choice as its message and finish reason."""
    if plan.mode == "named":
        assert plan.function is not None
        return ChatMessage(content=None, tool_calls=[_tool_call(plan.function, out.text)]), _reason(
            out.finish_reason, True
        )
    if plan.mode == "required":
        calls = [_tool_call(name, args) for name, args in array_calls(out.text)]
        return ChatMessage(content=None, tool_calls=calls or None), _reason(out.finish_reason, bool(calls))
    if plan.mode == "auto":
        parsed = parse_generated(tokenizer, out.token_ids)
        if parsed.tool_calls:
            content = parsed.content if parsed.content.strip() else None
            message = ChatMessage(content=content, tool_calls=_openai_calls(parsed.tool_calls))
            return message, _reason(out.finish_reason, True)
        return ChatMessage(content=parsed.content), finish_reason(out.finish_reason)
    return ChatMessage(content=out.text), finish_reason(out.finish_reason)


def _call_delta(index: int, call: ToolCall) -> ChatDelta:
    function = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
    return ChatDelta(tool_calls=[ToolCallDelta(index=index, id=call.id, type="function", function=function)])


def _held_back_marker(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``[TOOL_CALLS]``."""
    for k in range(min(len(TOOL_CALLS) - 1, len(text)), 0, -1):
        if text.endswith(TOOL_CALLS[:k]):
            return k
    return 0


class MessageStream:
    """One choice's outputs as streamed chat deltas (see the module docstring)."""

    def __init__(self, plan: ToolPlan, tokenizer: Tokenizer) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.sent = ""  # content sent so far
        self.calls = 0  # tool calls started so far
        self.marker_id = tokenizer.special_id(TOOL_CALLS) if plan.mode == "auto" else None
        self.before_marker: str | None = None  # auto: the content before the marker, once it came

    def feed(self, out: RequestOutput) -> tuple[list[ChatDelta], FinishReason | None]:
        """The deltas this output adds, and the finish reason when it is the last one."""
        mode = self.plan.mode
        if mode == "named":
            deltas = self._named(out)
        elif mode == "required":
            deltas = self._required(out)
        elif mode == "auto":
            return self._auto(out)
        else:
            deltas = [ChatDelta(content=out.delta_text)] if out.delta_text else []
        if not out.finished:
            return deltas, None
        return deltas, _reason(out.finish_reason, mode in ("named", "required") and self.calls > 0)

    def _named(self, out: RequestOutput) -> list[ChatDelta]:
        if self.calls:
            return [self._arguments(out.delta_text)] if out.delta_text else []
        if not (out.delta_text or out.finished):
            return []
        assert self.plan.function is not None
        self.calls = 1
        return [_call_delta(0, _tool_call(self.plan.function, out.delta_text))]

    @staticmethod
    def _arguments(piece: str) -> ChatDelta:
        return ChatDelta(tool_calls=[ToolCallDelta(index=0, function=FunctionCallDelta(arguments=piece))])

    def _required(self, out: RequestOutput) -> list[ChatDelta]:
        calls = array_calls(out.text)
        deltas = [_call_delta(i, _tool_call(name, args)) for i, (name, args) in enumerate(calls) if i >= self.calls]
        self.calls = len(calls)
        return deltas

    def _content(self, visible: str) -> list[ChatDelta]:
        if not visible.startswith(self.sent) or len(visible) == len(self.sent):
            return []
        piece, self.sent = visible[len(self.sent) :], visible
        return [ChatDelta(content=piece)]

    def _visible(self, out: RequestOutput) -> str:
        """The content a client may see so far: the text before the marker, less a partial marker at its end."""
        if self.marker_id is not None:
            if self.before_marker is None and self.marker_id in out.new_token_ids:
                ids = list(out.token_ids)
                self.before_marker = self.tokenizer.decode(ids[: ids.index(self.marker_id)])
            return self.before_marker if self.before_marker is not None else out.text
        text, found, _ = out.text.partition(TOOL_CALLS)
        return text if found else text[: len(text) - _held_back_marker(text)]

    def _auto(self, out: RequestOutput) -> tuple[list[ChatDelta], FinishReason | None]:
        if not out.finished:
            return self._content(self._visible(out)), None
        parsed = parse_generated(self.tokenizer, out.token_ids)
        deltas = self._content(parsed.content)
        if not parsed.tool_calls:
            return deltas, finish_reason(out.finish_reason)
        calls = _openai_calls(parsed.tool_calls)
        self.calls = len(calls)
        return deltas + [_call_delta(i, c) for i, c in enumerate(calls)], _reason(out.finish_reason, True)
