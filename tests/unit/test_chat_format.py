"""Chat encoding of every bundled Mistral tokenizer against mistral-common's own ``encode_chat_completion``.

The reference converts the same OpenAI-shaped dicts with mistral-common's own converters
(``convert_openai_messages`` / ``convert_openai_tools``) and encodes them with ``MistralTokenizer.v1()`` ... ``v7()``
and the tekken tokenizer; mixserve loads the same files through ``Tokenizer`` (versioned names, and the unversioned
``tokenizer.model`` of a Hugging Face folder, whose version it infers).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from mistral_common.exceptions import TokenizerException
from mistral_common.protocol.instruct.converters import convert_openai_messages, convert_openai_tools
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from cluster.errors import ChatFormatError
from cluster.text.chat_format import mistral_call_id
from cluster.text.tokenizer import Tokenizer
from tests.tokenizer_refs import DATA, FILES, mixserve, reference

TOOL_VERSIONS = ["v2", "v3", "v7", "tekken"]


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {name: mixserve(name) for name in FILES}


@pytest.fixture(scope="module")
def refs() -> dict[str, MistralTokenizer]:
    return {name: reference(name) for name in FILES}


def encoded(mistral: MistralTokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    request = ChatCompletionRequest(
        messages=convert_openai_messages(messages),  # type: ignore[arg-type]
        tools=convert_openai_tools(tools) if tools else None,
    )
    return mistral.encode_chat_completion(request).tokens


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": {}}}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


PLAIN = {
    "single_user": [{"role": "user", "content": "Hello"}],
    "system_user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "developer_role": [{"role": "developer", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "system_multi_turn": [
        {"role": "system", "content": "Answer in French.\nBe brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Bien, merci."},
        {"role": "user", "content": "Bye"},
    ],
    "text_parts": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
    ],
    "unicode": [
        {"role": "user", "content": "  leading and trailing  "},
        {"role": "assistant", "content": " 中文 😀\nsecond line"},
        {"role": "user", "content": "龘 🦜\n\n"},
    ],
}
WITH_TOOLS = {
    "tools_only": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER, TIME]),
    "call_and_result": (
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("abcdefghi", "get_weather", '{"city": "Paris"}')],
            },
            {"role": "tool", "tool_call_id": "abcdefghi", "name": "get_weather", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."},
            {"role": "user", "content": "Thanks! And the time?"},
        ],
        [WEATHER, TIME],
    ),
    "ends_with_tool_result": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("Call00001", "get_weather", '{"city": "Paris"}')]},
            {"role": "tool", "tool_call_id": "Call00001", "name": "get_weather", "content": "sunny, 21 °C"},
        ],
        [WEATHER],
    ),
}
# v2 encodes one tool result per call only; parallel calls are v3+.
PARALLEL = (
    [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {
            "role": "assistant",
            "tool_calls": [call("aaaaaaaa1", "get_weather", '{"city": "Oslo"}'), call("bbbbbbbb2", "get_time", "{}")],
        },
        {"role": "tool", "tool_call_id": "aaaaaaaa1", "name": "get_weather", "content": "snow"},
        {
            "role": "tool",
            "tool_call_id": "bbbbbbbb2",
            "name": "get_time",
            "content": [{"type": "text", "text": "9:00"}],
        },
    ],
    [WEATHER, TIME],
)


@pytest.mark.parametrize("version", sorted(FILES))
@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_chat_matches_mistral_common(toks: dict, refs: dict, version: str, name: str) -> None:
    messages = PLAIN[name]
    assert toks[version].encode_chat(messages) == encoded(refs[version], messages, None)


@pytest.mark.parametrize("version", TOOL_VERSIONS)
@pytest.mark.parametrize("name", sorted(WITH_TOOLS))
def test_tools_chat_matches_mistral_common(toks: dict, refs: dict, version: str, name: str) -> None:
    messages, tools = WITH_TOOLS[name]
    ids = toks[version].encode_chat(messages, tools=tools)
    assert ids == encoded(refs[version], messages, tools)
    available = toks[version].special_id("[AVAILABLE_TOOLS]")
    assert available is not None and available in ids  # the tools really are in the prompt


@pytest.mark.parametrize("version", ["v3", "v7", "tekken"])
def test_parallel_tool_calls_match_mistral_common(toks: dict, refs: dict, version: str) -> None:
    messages, tools = PARALLEL
    assert toks[version].encode_chat(messages, tools=tools) == encoded(refs[version], messages, tools)


def test_reference_by_hand_v3(toks: dict) -> None:
    # The same conversation built directly from mistral-common's classes, not its OpenAI converters.
    messages, tools = WITH_TOOLS["call_and_result"]
    request = ChatCompletionRequest(
        messages=[
            SystemMessage(content="Use tools."),
            UserMessage(content="Weather in Paris?"),
            AssistantMessage(
                tool_calls=[
                    ToolCall(id="abcdefghi", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
                ]
            ),
            ToolMessage(tool_call_id="abcdefghi", name="get_weather", content='{"temp": 21}'),
            AssistantMessage(content="21 degrees."),
            UserMessage(content="Thanks! And the time?"),
        ],
        tools=[Tool(function=Function(**WEATHER["function"])), Tool(function=Function(**TIME["function"]))],
    )
    expected = MistralTokenizer.v3().encode_chat_completion(request).tokens
    assert toks["v3"].encode_chat(messages, tools=tools) == expected
    assert expected[:2] == [1, 3] and 6 in expected  # <s>[INST] ... [AVAILABLE_TOOLS]: control tokens, not text


def test_unversioned_tokenizer_model_is_read_as_its_version(tmp_path: Path, refs: dict) -> None:
    # Mixtral-8x22B's Hugging Face folder ships the v3 model as plain tokenizer.model, which mistral-common's
    # file-name detection would take for v1 ("[INST]" as text: [1, 1501, 17057, ...]).
    for version in ("v3", "v7"):
        folder = tmp_path / version
        folder.mkdir()
        shutil.copy(DATA / FILES[version], folder / "tokenizer.model")
        tok = Tokenizer.from_dir(folder)
        assert tok.version == version
        messages, tools = WITH_TOOLS["call_and_result"]
        assert tok.encode_chat(messages, tools=tools) == encoded(refs[version], messages, tools)
    assert Tokenizer.from_dir(tmp_path / "v3").encode_chat([{"role": "user", "content": "Hi"}])[:2] == [1, 3]


def test_openai_call_ids_are_mapped_consistently(toks: dict, refs: dict) -> None:
    openai_id = "call_9f8a7b6c5d4e3f2a1b0c"
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [call(openai_id, "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": openai_id, "content": "sunny"},
    ]
    mapped = mistral_call_id(openai_id)
    assert len(mapped) == 9 and mapped.isalnum() and mapped == mistral_call_id(openai_id)
    assert mistral_call_id("abcdefghi") == "abcdefghi"
    expected_messages = [
        messages[0],
        {"role": "assistant", "tool_calls": [call(mapped, "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": mapped, "content": "sunny"},
    ]
    for version in ("v3", "v7", "tekken"):
        assert toks[version].encode_chat(messages, tools=[WEATHER]) == encoded(
            refs[version], expected_messages, [WEATHER]
        )


def test_arguments_as_object_and_empty_tools(toks: dict) -> None:
    as_string = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call("abcdefghi", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"},
    ]
    as_object = [dict(m) for m in as_string]
    as_object[1] = {
        "role": "assistant",
        "tool_calls": [
            {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    }
    assert toks["v3"].encode_chat(as_object) == toks["v3"].encode_chat(as_string)
    hello = [{"role": "user", "content": "Hello"}]
    assert toks["v1"].encode_chat(hello, tools=[]) == toks["v1"].encode_chat(hello)  # [] means no tools


# --------------------------------------------------------------------------- errors a client can cause

_U = {"role": "user", "content": "Weather?"}
_CALL = {"role": "assistant", "tool_calls": [call("abcdefghi", "get_weather", "{}")]}
_RESULT = {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"}


@pytest.mark.parametrize(
    ("version", "messages", "tools", "param", "match"),
    [
        ("v1", [_U], [WEATHER], "tools", r"Mistral tokenizer v1\) does not support tools"),
        ("v1", [_U, _CALL, _RESULT], None, "messages", r"message 1: an assistant message with tool_calls: "),
        (
            "v1",
            [_U, {"role": "assistant", "content": "x"}, _RESULT],
            None,
            "messages",
            r"message 2: a tool result \(role 'tool'\): ",
        ),
        ("v1", [{"role": "narrator", "content": "x"}], None, "messages", r"message 0: unknown role 'narrator'"),
        ("v3", [_U], "get_weather", "tools", r"tools must be a list of tools, got str"),
        ("v3", [_U], [{"type": "function"}], "tools", r"tools\[0\]: expected \{'type': 'function'"),
        ("v3", [_U], [{"type": "retrieval", "function": {"name": "x"}}], "tools", r"tools\[0\]: expected"),
        (
            "v3",
            [_U],
            [{"type": "function", "function": {"name": ""}}],
            "tools",
            r"tools\[0\]: .*non-empty string 'name'",
        ),
        (
            "v3",
            [_U],
            [{"type": "function", "function": {"name": "bad name!"}}],
            "tools",
            r"Function name was bad name!",
        ),
        (
            "v3",
            [_U],
            [{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}],
            "tools",
            r"Invalid tool schema",
        ),
        (
            "v3",
            [_U],
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            "tools",
            r"JSON schema object",
        ),
        (
            "v3",
            [_RESULT],
            None,
            "messages",
            r"message 0: a tool message must follow an assistant message with tool_calls",
        ),
        ("v3", [_U, _RESULT], None, "messages", r"message 1: a tool message must follow an assistant"),
        (
            "v3",
            [_U, _CALL, {**_RESULT, "tool_call_id": "zzzzzzzzz"}],
            None,
            "messages",
            r"message 2: tool_call_id 'zzzzzzzzz' matches no tool call of message 1",
        ),
        (
            "v3",
            [_U, _CALL, {"role": "tool", "content": "x"}],
            None,
            "messages",
            r"message 2: a tool message needs a non-empty string 'tool_call_id'",
        ),
        (
            "v3",
            [
                _U,
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            ],
            None,
            "messages",
            r"message 1: tool_calls\[0\]: needs a non-empty string 'id'",
        ),
        (
            "v3",
            [
                _U,
                {
                    "role": "assistant",
                    "tool_calls": [call("abcdefghi", "f", "{}") | {"function": {"name": "f", "arguments": 3}}],
                },
            ],
            None,
            "messages",
            r"'arguments' must be a JSON string, got int",
        ),
        (
            "v3",
            [_U, {"role": "assistant", "tool_calls": "f()"}],
            None,
            "messages",
            r"message 1: tool_calls must be a list, got str",
        ),
        (
            "v3",
            [_U, {"role": "assistant", "content": "Let me check.", **_CALL}, _RESULT],
            None,
            "messages",
            r"either content or tool_calls, but not both",
        ),
        ("v3", [_U, {"role": "assistant", "content": "x"}], None, "messages", r"Expected last role User or Tool"),
        (
            "v3",
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            None,
            "messages",
            r"message 0: content must be a string, got list .*part 0 is 'image_url'",
        ),
        (
            "v3",
            [{"role": "narrator", "content": "x"}],
            None,
            "messages",
            r"message 0: unknown role 'narrator' \(expected one of system, developer, user, assistant, tool\)",
        ),
        ("v3", [{"role": "user", "content": 3}], None, "messages", r"message 0: content must be a string, got int"),
        ("v3", [], None, "messages", r"messages is empty"),
        ("tekken", [_U, _CALL], None, "messages", r"Expected last role User or Tool"),
    ],
)
def test_errors_name_the_field(toks: dict, version: str, messages: Any, tools: Any, param: str, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match) as err:
        toks[version].encode_chat(messages, tools=tools)
    assert err.value.param == param


# mistral-common's v1 instruct tokenizer raises on any assistant tool_calls or tool result, wherever they are.
V1_TOOL_CONVERSATIONS = {
    "call_and_result": WITH_TOOLS["call_and_result"][0],
    "ends_with_tool_result": WITH_TOOLS["ends_with_tool_result"][0],
    "parallel_calls": PARALLEL[0],
    "call_then_user": [_U, _CALL, {"role": "user", "content": "Never mind."}],
}


@pytest.mark.parametrize("name", sorted(V1_TOOL_CONVERSATIONS))
def test_v1_tool_calls_and_results_are_refused_as_mistral_common_refuses_them(
    toks: dict, refs: dict, name: str
) -> None:
    messages = V1_TOOL_CONVERSATIONS[name]
    with pytest.raises(TokenizerException, match="Tools not implemented for tokenizer V1"):
        encoded(refs["v1"], messages, None)
    with pytest.raises(ChatFormatError) as err:
        toks["v1"].encode_chat(messages)
    assert err.value.param == "messages"
    first = next(i for i, m in enumerate(messages) if m.get("tool_calls") or m["role"] == "tool")
    assert err.value.message.startswith(f"message {first}: ")
    assert "(Mistral tokenizer v1, as Mixtral-8x7B's) has no tool calls or tool results" in err.value.message
    assert "'Tools not implemented for tokenizer V1'" in err.value.message  # why: mistral-common refuses them
