"""Tool calls over real HTTP with the official `openai` client, on the shared random-weight model (Mistral v1
tokenizer: no tools in the prompt, so only the constrained modes call tools): a named function's arguments and
``required`` calls always validate against their function's schema, streamed tool-call deltas assemble into the
non-streamed calls, and what cannot work is a 400 naming the field. (The native ``auto`` parsing of v3+ output is
tested on recorded token sequences in test_tool_output.py.)"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import OpenAI

from tests.serving.helpers import API_KEY, MODEL_NAME, TIME_ARGS, WEATHER_ARGS

pytestmark = [pytest.mark.ray, pytest.mark.serving]
USER = [{"role": "user", "content": "What is the weather in Paris, and what time is it?"}]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME_ARGS}},
]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(served):
    base, _, _ = served
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield c
    c.close()


def _create(client: OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=160, temperature=1.0)
    return client.chat.completions.create(**{**args, **kwargs})


def _calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_named_function_arguments_always_validate(client, reference_llm):
    r = _create(client, tool_choice=NAMED, n=8, seed=11)
    assert r.usage.prompt_tokens == len(reference_llm.tokenizer.encode_chat(USER))  # v1: no tools in the prompt
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    assert len({c.message.tool_calls[0].function.arguments for c in r.choices}) > 1


def test_required_with_two_tools(client):
    r = _create(client, tool_choice="required", n=8, seed=12, max_tokens=400)  # calls are many or few: room for 10+
    names = set()
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        calls = _calls(c.message)
        assert calls and len({tc.id for tc in c.message.tool_calls}) == len(calls)
        for name, arguments in calls:
            jsonschema.validate(arguments, SCHEMAS[name])
            names.add(name)
    assert names == {"get_weather", "get_time"}  # the model chooses among the tools
    single = _create(client, tool_choice="required", parallel_tool_calls=False, n=4, seed=13)
    assert all(len(c.message.tool_calls) == 1 for c in single.choices)


def _assembled(stream: Any) -> tuple[str, list[dict[str, str]], str | None, int]:
    """Content, tool calls (by index) and finish reason of a streamed choice, as a client assembles them; and the
    number of chunks that carried tool-call pieces."""
    content, calls, reason, pieces = "", {}, None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        reason = choice.finish_reason or reason
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            pieces += 1
            call = calls.setdefault(tc.index, {"id": "", "type": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            call["type"] += tc.type or ""
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], reason, pieces


@pytest.mark.parametrize("tool_choice", [NAMED, "required"], ids=["named", "required"])
def test_streamed_deltas_assemble_into_the_call(client, tool_choice):
    kwargs = {"tool_choice": tool_choice, "seed": 21, "max_tokens": 400}
    whole = _create(client, **kwargs).choices[0]
    content, calls, reason, pieces = _assembled(_create(client, **kwargs, stream=True))
    assert content == "" and reason == whole.finish_reason == "tool_calls"
    assert [(c["type"], c["name"], c["arguments"]) for c in calls] == [
        (c.type, c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"] for c in calls)  # ids are fresh per response, as OpenAI's
    assert pieces >= len(calls)


def test_tool_choice_none_is_plain_text(client, reference_llm):
    r = _create(client, tool_choice="none", temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(reference_llm.tokenizer.encode_chat(USER))


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({}, "tool_choice", "v1"),  # auto (the default with tools): the v1 prompt has no place for tools
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tools", "only one"),
        (
            {
                "tool_choice": NAMED,
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                        },
                    }
                ],
            },
            "tools",
            "nonsense",
        ),
    ],
)
def test_tool_errors_name_the_field(client, kwargs, param, needle):
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, max_tokens=8, **kwargs)
    assert info.value.body["param"] == param and needle in info.value.body["message"]
