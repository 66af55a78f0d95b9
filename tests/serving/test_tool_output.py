"""Tools and structured output at the serving edge without a server: which field constrains a request, the tool
plan per tool_choice, and a model's output (recorded token sequences of v1 and v3 tokenizers) as the whole message
and as streamed deltas, which must assemble into the same message."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

from cluster.engine.request import RequestOutput
from cluster.errors import InvalidRequestError, SamplingParamsError
from cluster.serve.ingress.body import parse_body
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from cluster.serve.ingress.openai_api.structured import Constraint, renamed, request_constraint
from cluster.serve.ingress.openai_api.tool_output import MessageStream, array_calls, final_message
from cluster.serve.ingress.openai_api.tools import ToolPlan, calls_schema, plan_tools
from cluster.text.tokenizer import Tokenizer
from tests.tokenizer_refs import mixserve, reference

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def chat_request(**body: Any) -> ChatCompletionRequest:
    return parse_body(json.dumps({"messages": USER, **body}).encode(), ChatCompletionRequest)


def outputs(
    tok: Tokenizer, ids: list[int], steps: list[int] | None = None, reason: Any = "stop"
) -> list[RequestOutput]:
    """A recorded generation as the engine streams it: one output per step (``steps``: tokens per step)."""
    steps = steps or [1] * len(ids)
    assert sum(steps) == len(ids)
    outs, done, prev = [], 0, ""
    for k, n in enumerate(steps):
        new = ids[done : done + n]
        done += n
        text = tok.decode(ids[:done])
        last = k == len(steps) - 1
        outs.append(RequestOutput("r", [1], ids[:done], text, new, text[len(prev) :], last, reason if last else None))
        prev = text
    return outs


def streamed(plan: ToolPlan, tok: Tokenizer, outs: list[RequestOutput]) -> tuple[dict[str, Any], str | None, list]:
    """The deltas of a stream assembled as a client does (content joined, tool calls by index)."""
    stream = MessageStream(plan, tok)
    content, calls, deltas, reason = "", {}, [], None
    for out in outs:
        ds, r = stream.feed(out)
        deltas += ds
        reason = r or reason
        for d in ds:
            content += d.content or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "type": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["type"] = tc.type or call["type"]
                if tc.function:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)]}, reason, deltas


def whole(plan: ToolPlan, tok: Tokenizer, out: RequestOutput) -> tuple[dict[str, Any], str | None]:
    message, reason = final_message(plan, tok, out)
    calls = [
        {"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]
    return {"content": message.content or "", "tool_calls": calls}, reason


def same_calls(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal but for the ids, which are fresh per response (both must have one)."""
    assert all(c["id"] and c["type"] == "function" for c in a["tool_calls"] + b["tool_calls"])
    strip = [{k: v for k, v in c.items() if k != "id"} for c in a["tool_calls"]]
    return a["content"] == b["content"] and strip == [
        {k: v for k, v in c.items() if k != "id"} for c in b["tool_calls"]
    ]


# -- which field constrains the output ---------------------------------------------------------------------------


def test_constraints_of_each_field():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        ({"response_format": {"type": "json_object"}}, ("json_object", ""), "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": schema, "strict": True},
                }
            },
            ("json_schema", json.dumps(schema)),
            "response_format",
        ),
        ({"guided_json": schema}, ("json_schema", json.dumps(schema)), "guided_json"),
        ({"guided_json": json.dumps(schema)}, ("json_schema", json.dumps(schema)), "guided_json"),
        ({"guided_regex": "[a-z]+"}, ("regex", "[a-z]+"), "guided_regex"),
        ({"guided_choice": ["x", "y"]}, ("choice", '["x", "y"]'), "guided_choice"),
        ({"guided_grammar": 'start: "a"'}, ("lark", 'start: "a"'), "guided_grammar"),
    ]
    for body, (kind, spec), param in cases:
        for req in (chat_request(**body), parse_body(json.dumps({"prompt": "x", **body}).encode(), CompletionRequest)):
            c = request_constraint(req)
            assert c is not None and (c.output.kind, c.output.spec, c.param) == (kind, spec, param)
    assert request_constraint(chat_request(response_format={"type": "text"})) is None
    assert request_constraint(chat_request()) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_choice": ["a"], "guided_grammar": 'start: "a"'}, "guided_grammar"),
        ({"guided_json": {"type": "object"}, "tools": [WEATHER], "tool_choice": "required"}, "tools"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1]"}, "guided_json"),
    ],
)
def test_two_constraints_or_a_bad_guided_json_are_400(body, param):
    req = chat_request(**body)
    with pytest.raises(InvalidRequestError) as info:
        request_constraint(req, plan_tools(req, mixserve("v1")).constraint)
    assert info.value.param == param


def test_engine_errors_name_the_field_of_the_spec():
    err = SamplingParamsError("invalid regex: x", param="response_format")
    regex = request_constraint(chat_request(guided_regex="("))
    assert isinstance(regex, Constraint)
    assert renamed(err, regex).param == "guided_regex" and "guided_regex" in renamed(err, regex).message
    assert renamed(err, request_constraint(chat_request(response_format={"type": "json_object"}))) is err
    assert renamed(SamplingParamsError("x", param="top_p"), regex).param == "top_p"


# -- the tool plan ---------------------------------------------------------------------------------------------


def test_tool_plans():
    v1, v3 = mixserve("v1"), mixserve("v3")
    assert plan_tools(chat_request(), v1) == ToolPlan()
    assert plan_tools(chat_request(tools=[WEATHER], tool_choice="none"), v3).prompt_tools is None
    auto = plan_tools(chat_request(tools=[WEATHER]), v3)  # auto is the default with tools
    assert auto.mode == "auto" and auto.constraint is None and auto.prompt_tools == [WEATHER]
    named = chat_request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for tok, in_prompt in ((v1, False), (v3, True)):  # constrained with any tokenizer; tools in the prompt if it can
        plan = plan_tools(named, tok)
        assert plan.mode == "named" and plan.function == "get_weather" and (plan.prompt_tools is not None) == in_prompt
        assert plan.constraint is not None and plan.constraint.param == "tools"
        assert json.loads(plan.constraint.output.spec) == WEATHER["function"]["parameters"]
    required = plan_tools(chat_request(tools=[WEATHER, TIME], tool_choice="required"), v1)
    assert required.mode == "required" and required.prompt_tools is None and required.constraint is not None
    schema = json.loads(required.constraint.output.spec)
    jsonschema.validate(
        [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}], schema
    )
    for bad in (
        [],
        [{"name": "get_time", "arguments": {"x": 1}}],
        [{"name": "get_weather", "arguments": {}}],
        [{"name": "nope", "arguments": {}}],
        [{"name": "get_time"}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan_tools(chat_request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), v1)
    assert single.constraint is not None and json.loads(single.constraint.output.spec)["maxItems"] == 1


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"tools": [WEATHER]}, "tool_choice", "v1"),  # auto on v1: no place for tools in the prompt
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among",
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools", "twice"),
    ],
)
def test_tool_plan_errors(body, param, needle):
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(chat_request(**body), mixserve("v1"))
    assert info.value.param == param and needle in info.value.message


def test_required_schema_moves_defs_to_the_root():
    with_defs = {
        "type": "function",
        "function": {
            "name": "place",
            "parameters": {
                "type": "object",
                "properties": {"at": {"$ref": "#/$defs/Point"}},
                "required": ["at"],
                "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
            },
        },
    }
    req = chat_request(tools=[with_defs, TIME], tool_choice="required")
    schema = calls_schema(req.tools or [])
    assert "Point" in schema["$defs"]
    jsonschema.validate([{"name": "place", "arguments": {"at": {"x": 1}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "place", "arguments": {"at": {"y": 1}}}], schema)


# -- output: whole and streamed --------------------------------------------------------------------------------


def test_array_calls_keeps_complete_calls():
    text = '[{"name": "a", "arguments": {"x": "é"}}, {"name": "b", "arguments": {}}, {"name": "c", "argu'
    assert array_calls(text) == [("a", '{"x": "é"}'), ("b", "{}")]
    assert array_calls("") == [] and array_calls("[") == [] and array_calls('{"a": 1}') == []


def _plan(tok: Tokenizer, **body: Any) -> ToolPlan:
    return plan_tools(chat_request(tools=[WEATHER, TIME], **body), tok)


@pytest.mark.parametrize(("name", "content"), [("v3", None), ("v7", None), ("v7", "Let me check.")])
def test_auto_native_calls_stream_and_whole_agree(name, content):
    tok = mixserve(name)
    calls = [
        ToolCall(id="abcdefghi", function=FunctionCall(name="get_weather", arguments='{"city": "Zürich"}')),
        ToolCall(id="Zyx987wvu", function=FunctionCall(name="get_time", arguments="{}")),
    ]
    ids = reference(name).instruct_tokenizer.encode_assistant_message(  # type: ignore[attr-defined]
        AssistantMessage(content=content, tool_calls=calls), is_before_last_user_message=False
    )
    plan = _plan(tok)
    for steps in (None, [3] * (len(ids) // 3) + ([len(ids) % 3] if len(ids) % 3 else [])):
        outs = outputs(tok, ids, steps)
        got, reason, deltas = streamed(plan, tok, outs)
        expected, whole_reason = whole(plan, tok, outs[-1])
        assert reason == whole_reason == "tool_calls"
        assert same_calls(got, expected)
        assert [(c["name"], json.loads(c["arguments"])) for c in got["tool_calls"]] == [
            ("get_weather", {"city": "Zürich"}),
            ("get_time", {}),
        ]
        assert got["content"] == (content or "")
        assert all("TOOL_CALLS" not in (d.content or "") and "get_weather" not in (d.content or "") for d in deltas)
        assert [c["id"] for c in got["tool_calls"]] == ["abcdefghi", "Zyx987wvu"]  # the model's own ids


def test_auto_plain_text_and_unparsable_calls_stream_as_content():
    tok = mixserve("v3")
    plan = _plan(tok)
    text_ids = tok.encode("Just text [TOOL no call.", bos=False, eos=True)
    cut = reference(
        "v3"
    ).instruct_tokenizer.encode_assistant_message(  # type: ignore[attr-defined]
        AssistantMessage(tool_calls=[ToolCall(id="abcdefghi", function=FunctionCall(name="f", arguments="{}"))]),
        is_before_last_user_message=False,
    )[:-4]
    for ids, reason in ((text_ids, "stop"), (cut, "length")):
        outs = outputs(tok, ids, reason=reason)
        got, got_reason, _ = streamed(plan, tok, outs)
        expected, whole_reason = whole(plan, tok, outs[-1])
        assert got == expected and got["tool_calls"] == [] and got_reason == whole_reason == reason
        assert got["content"] == tok.decode(ids)


def test_auto_literal_marker_is_held_back():
    tok = mixserve("v1")  # no [TOOL_CALLS] control token: the marker is text (as a chat-template model writes it)
    plan = ToolPlan("auto", names=("get_time",))
    ids = tok.encode('Sure. [TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', bos=False, eos=True)
    got, reason, deltas = streamed(plan, tok, outputs(tok, ids))
    expected, _ = whole(plan, tok, outputs(tok, ids)[-1])
    assert reason == "tool_calls" and same_calls(got, expected) and got["content"] == "Sure. "
    assert not any("[" in (d.content or "") for d in deltas)


def test_constrained_calls_stream_and_whole_agree():
    tok = mixserve("v1")
    named = _plan(tok, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    args = '{"city": "Zürich", "days": 2}'
    ids = tok.encode(args, bos=False)
    outs = outputs(tok, ids)
    got, reason, deltas = streamed(named, tok, outs)
    expected, whole_reason = whole(named, tok, outs[-1])
    assert same_calls(got, expected) and reason == whole_reason == "tool_calls"
    assert got["tool_calls"][0]["name"] == "get_weather" and got["tool_calls"][0]["arguments"] == tok.decode(ids)
    assert deltas[0].tool_calls[0].id and len(deltas) > 1  # the arguments stream as they come

    required = _plan(tok, tool_choice="required")
    text = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    ids = tok.encode(text, bos=False)
    for reason_in, cut in (("stop", len(ids)), ("length", len(ids) - 3)):
        outs = outputs(tok, ids[:cut], reason=reason_in)
        got, reason, deltas = streamed(required, tok, outs)
        expected, whole_reason = whole(required, tok, outs[-1])
        assert same_calls(got, expected) and reason == whole_reason
        names = [c["name"] for c in got["tool_calls"]]
        assert names == (["get_time", "get_weather"] if reason_in == "stop" else ["get_time"])
        assert reason == ("tool_calls" if reason_in == "stop" else "length")
        assert len(deltas) == len(names) and got["content"] == ""  # one delta per complete call, no raw JSON


@pytest.mark.parametrize("name", ["v2", "v3", "v7"])
def test_a_tool_conversation_reaches_the_chat_format(name):
    """OpenAI's request shapes (assistant tool_calls, tool results, tools) through the request models give the ids
    of mistral-common's own ``ChatCompletionRequest.from_openai`` of the same dicts."""
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abcdefghi", "name": "get_weather", "content": "12 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    req = parse_body(json.dumps({"messages": messages, "tools": [WEATHER]}).encode(), ChatCompletionRequest)
    plan = plan_tools(req, mixserve(name))
    ids = mixserve(name).encode_chat(req.chat(), tools=plan.prompt_tools)
    from_openai = reference(name).encode_chat_completion(MistralRequest.from_openai(messages, tools=[WEATHER]))
    assert ids == from_openai.tokens
