"""Tool-call parsing of model output, against mistral-common's own encoding of tool calls and its decoder."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerBase

from cluster.text.tool_calls import ParsedOutput, new_call_id, parse_generated, parse_tool_calls
from tests.tokenizer_refs import mixserve, reference

CALLS = [
    ToolCall(id="abcdefghi", function=FunctionCall(name="get_weather", arguments='{"city": "Zürich", "days": 3}')),
    ToolCall(id="Zyx987wvu", function=FunctionCall(name="get_time", arguments="{}")),
]


def fixed_ids() -> Any:
    counter = itertools.count()
    return lambda: f"new{next(counter):06d}"


def assistant_ids(name: str, message: AssistantMessage) -> list[int]:
    """What a model trained on this format generates: mistral-common's encoding of the assistant turn (EOS last)."""
    instruct = reference(name).instruct_tokenizer
    assert isinstance(instruct, InstructTokenizerBase)
    return instruct.encode_assistant_message(message, is_before_last_user_message=False)


def mistral_common_calls(name: str, ids: list[int]) -> list[ToolCall]:
    """mistral-common's own decoder (experimental.tools) of generated ids."""
    raw = reference(name).instruct_tokenizer.tokenizer
    body = ids[:-1] if ids[-1] == raw.eos_id else ids
    _, call_tokens = _split_content_and_tool_calls(body, raw.get_special_token("[TOOL_CALLS]"))
    return _decode_tool_calls(call_tokens, raw)


def as_openai(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
        }
        for c in calls
    ]


def loaded(parsed: ParsedOutput) -> list[dict[str, Any]]:
    """The parsed calls with arguments as objects (JSON strings may differ in escaping only)."""
    calls = [dict(c, function=dict(c["function"])) for c in parsed.tool_calls]
    for c in calls:
        assert isinstance(c["function"]["arguments"], str)
        c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return calls


@pytest.mark.parametrize("name", ["v2", "v3", "v7", "tekken"])
@pytest.mark.parametrize("count", [1, 2])
def test_generated_calls_match_mistral_common(name: str, count: int) -> None:
    ids = assistant_ids(name, AssistantMessage(tool_calls=CALLS[:count]))
    parsed = parse_generated(mixserve(name), ids, new_id=fixed_ids())
    expected = as_openai(mistral_common_calls(name, ids))
    if name == "v2":  # v2 writes no call ids: mistral-common says "null", mixserve makes fresh ones
        expected = [dict(c, id=f"new{k:06d}") for k, c in enumerate(expected)]
    assert loaded(parsed) == expected
    assert parsed.content == ""
    assert [c["function"]["name"] for c in parsed.tool_calls] == [c.function.name for c in CALLS[:count]]


def test_content_before_the_calls_v7() -> None:
    tok = mixserve("v7")
    ids = assistant_ids("v7", AssistantMessage(content="Let me check.", tool_calls=CALLS[:1]))
    parsed = parse_generated(tok, ids)
    assert parsed.content == "Let me check."
    assert loaded(parsed) == as_openai(mistral_common_calls("v7", ids))


def test_plain_output_and_unparsable_calls() -> None:
    tok = mixserve("v3")
    text_ids = tok.encode("No tools needed, 中文 🦜.", bos=False, eos=True)
    assert parse_generated(tok, text_ids) == ParsedOutput("No tools needed, 中文 🦜.")
    # Cut off in the middle of the JSON (max_tokens): the client gets the text it would have streamed.
    ids = assistant_ids("v3", AssistantMessage(tool_calls=CALLS[:1]))[:-6]
    parsed = parse_generated(tok, ids)
    assert parsed.tool_calls == [] and parsed.content == tok.decode(ids) and parsed.content.startswith('[{"name"')


def test_literal_marker_text_without_a_control_token() -> None:
    # v1 has no [TOOL_CALLS] control token: a model writing the marker as text is parsed from the decoded text.
    tok = mixserve("v1")
    ids = tok.encode('[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', bos=False, eos=True)
    parsed = parse_generated(tok, ids, new_id=fixed_ids())
    assert parsed.tool_calls == [
        {"id": "new000000", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    ]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("plain text", "plain text", []),
        (
            'Sure.[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]',
            "Sure.",
            [("new000000", "f", '{"a": 1}')],
        ),
        (  # a single object instead of a list, an id of the model's own, arguments already a string
            '[TOOL_CALLS] {"name": "f", "arguments": "{\\"a\\": 1}", "id": "abcdefghi"} ',
            "",
            [("abcdefghi", "f", '{"a": 1}')],
        ),
        ('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "null"}]', "", [("new000000", "f", "{}")]),
        (  # v11+: one [TOOL_CALLS] per call, arguments after [ARGS]
            'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
            "Checking.",
            [("new000000", "get_weather", '{"city": "Paris"}'), ("new000001", "get_time", "{}")],
        ),
        ("[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{}", "", [("abc123XYZ", "f", "{}")]),
        ('[TOOL_CALLS]f[ARGS]{"unicode": "Zürich"}', "", [("new000000", "f", '{"unicode": "Zürich"}')]),
        # not parsable: plain text with the markers removed
        ('[TOOL_CALLS][{"name": "f", "arguments": {"a":', '[{"name": "f", "arguments": {"a":', []),
        ("[TOOL_CALLS][]", "[]", []),
        ('[TOOL_CALLS][{"arguments": {}}]', '[{"arguments": {}}]', []),
        ("x[TOOL_CALLS]f[ARGS]not json", "xfnot json", []),
        ("[TOOL_CALLS][ARGS]{}", "{}", []),
        ("[TOOL_CALLS]f[ARGS]{}[ARGS]{}", "f{}{}", []),
    ],
)
def test_parse_tool_calls_text(text: str, content: str, calls: list[tuple[str, str, str]]) -> None:
    parsed = parse_tool_calls(text, new_id=fixed_ids())
    assert parsed.content == content
    assert parsed.tool_calls == [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
    ]


def test_parsed_calls_feed_back_into_the_next_prompt() -> None:
    # The OpenAI round trip: the parsed call goes back as the assistant message, followed by its result.
    tok = mixserve("v3")
    parsed = parse_generated(tok, assistant_ids("v3", AssistantMessage(tool_calls=[CALLS[1]])))
    call_id = new_call_id()
    assert len(call_id) == 9 and call_id.isalnum() and new_call_id() != call_id
    messages = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.tool_calls},
        {"role": "tool", "tool_call_id": parsed.tool_calls[0]["id"], "content": "09:00"},
    ]
    ids = tok.encode_chat(messages)
    assert ids[-1] == tok.special_id("[/TOOL_RESULTS]")
