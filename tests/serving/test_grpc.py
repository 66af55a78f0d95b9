"""gRPC through Ray Serve's gRPC proxy, with a client generated from our proto."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import jsonschema
import numpy as np
import pytest

from cluster import SamplingParams
from cluster.serve.ingress.grpc_api.request import http_body
from cluster.serve.proto import mixserve_pb2 as pb
from tests.serving.helpers import GRPC_AUTH, MODEL_NAME, TIME_ARGS, WEATHER_ARGS, post

pytestmark = [pytest.mark.ray, pytest.mark.serving]


def test_unary_matches_llm(stub, reference_llm):
    r = stub.Generate(pb.GenerateRequest(prompt="Hello there", max_tokens=16, temperature=0), metadata=GRPC_AUTH)
    ref = reference_llm.generate("Hello there", SamplingParams(max_tokens=16, temperature=0))[0]
    assert list(r.token_ids) == ref.token_ids
    assert r.text == ref.text
    assert r.finish_reason == ref.finish_reason
    assert list(r.prompt_token_ids) == ref.prompt_token_ids
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_llm(stub, reference_llm):
    ids = [1, 330, 1000, 2000, 77]
    replies = list(
        stub.GenerateStream(
            pb.GenerateRequest(prompt_token_ids=ids, max_tokens=20, temperature=0, ignore_eos=True, logprobs=2),
            metadata=GRPC_AUTH,
        )
    )
    ref = reference_llm.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert [t for r in replies for t in r.token_ids] == ref.token_ids
    assert "".join(r.text for r in replies) == ref.text
    assert replies[-1].finish_reason == "length" and all(r.finish_reason == "" for r in replies[:-1])
    assert replies[-1].usage.completion_tokens == 20
    lps = [lp for r in replies for lp in r.logprobs]
    assert len(lps) == 20 and all(len(lp.top) == 2 and lp.top[0].token_id == lp.token_id for lp in lps)


def test_chat_messages(stub, reference_llm):
    msgs = [pb.ChatMessage(role="user", content="Say hi")]
    r = stub.Generate(pb.GenerateRequest(messages=msgs, max_tokens=8, temperature=0), metadata=GRPC_AUTH)
    ids = reference_llm.tokenizer.encode_chat([{"role": "user", "content": "Say hi"}])
    assert list(r.prompt_token_ids) == ids
    assert list(r.token_ids) == reference_llm.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].token_ids


BAD = [
    ("no prompt", pb.GenerateRequest(max_tokens=4), GRPC_AUTH, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    (
        "two prompts",
        pb.GenerateRequest(prompt="a", prompt_token_ids=[1]),
        GRPC_AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one",
    ),
    (
        "max_tokens 0",
        pb.GenerateRequest(prompt="a", max_tokens=0),
        GRPC_AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    ("top_p 2", pb.GenerateRequest(prompt="a", top_p=2.0), GRPC_AUTH, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (
        "negative temperature",
        pb.GenerateRequest(prompt="a", temperature=-1),
        GRPC_AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    ("too long", pb.GenerateRequest(prompt="a", max_tokens=5000), GRPC_AUTH, grpc.StatusCode.INVALID_ARGUMENT, "4096"),
    (
        "bad token id",
        pb.GenerateRequest(prompt_token_ids=[1, 999999]),
        GRPC_AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "token ids",
    ),
    (
        "bad chat",
        pb.GenerateRequest(messages=[pb.ChatMessage(role="assistant", content="x")]),
        GRPC_AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "message",
    ),
    (
        "unknown model",
        pb.GenerateRequest(prompt="a", model="gpt-4"),
        GRPC_AUTH,
        grpc.StatusCode.NOT_FOUND,
        "does not exist",
    ),
    ("missing key", pb.GenerateRequest(prompt="a"), (), grpc.StatusCode.UNAUTHENTICATED, "API key"),
    (
        "wrong key",
        pb.GenerateRequest(prompt="a"),
        (("authorization", "Bearer nope"),),
        grpc.StatusCode.UNAUTHENTICATED,
        "API key",
    ),
]


@pytest.mark.parametrize(("name", "request_", "metadata", "code", "needle"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_error_codes(stub, name, request_, metadata, code, needle, method):
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(request_, metadata=metadata)
        if method == "GenerateStream":
            list(result)
    assert info.value.code() == code
    assert needle.lower() in info.value.details().lower()


def test_model_name_accepted(stub):
    r = stub.Generate(pb.GenerateRequest(prompt="a", model=MODEL_NAME, max_tokens=2), metadata=GRPC_AUTH)
    assert len(r.token_ids) == 2


def test_sampling_fields_match_llm(stub, reference_llm):
    request = pb.GenerateRequest(
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        repetition_penalty=1.25,
        min_p=0.05,
        min_tokens=10,
        logit_bias={330: 3.0},
    )
    r = stub.Generate(request, metadata=GRPC_AUTH)
    params = SamplingParams(
        max_tokens=10,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        repetition_penalty=1.25,
        min_p=0.05000000074505806,  # as float32 carries it
        min_tokens=10,
        logit_bias=((330, 3.0),),
    )
    assert list(r.token_ids) == reference_llm.generate("Once upon a time", params)[0].token_ids
    forced = stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=4, temperature=0, logit_bias={1000: 100}),
                           metadata=GRPC_AUTH)  # fmt: skip
    assert list(forced.token_ids) == [1000] * 4


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.GenerateRequest(prompt="a", presence_penalty=5), "presence_penalty"),
        (pb.GenerateRequest(prompt="a", repetition_penalty=0), "repetition_penalty"),
        (pb.GenerateRequest(prompt="a", min_p=2), "min_p"),
        (pb.GenerateRequest(prompt="a", max_tokens=4, min_tokens=9), "min_tokens"),
        (pb.GenerateRequest(prompt="a", logit_bias={5: 500}), "logit_bias"),
        (pb.GenerateRequest(prompt="a", logit_bias={10**9: 1}), "logit_bias"),
        (pb.GenerateRequest(prompt="a", temperature=float("nan")), "temperature"),
    ],
)
def test_bad_sampling_fields_are_invalid_argument(stub, request_, needle):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_, metadata=GRPC_AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_tokenize(stub, reference_llm):
    tok = reference_llm.tokenizer
    r = stub.Tokenize(pb.TokenizeRequest(prompt="Hello world", return_token_strs=True), metadata=GRPC_AUTH)
    assert list(r.tokens) == tok.encode("Hello world") and r.count == len(r.tokens) and r.max_model_len == 4096
    assert list(r.token_strs) == [tok.id_to_piece(i) for i in r.tokens]
    r = stub.Tokenize(pb.TokenizeRequest(prompt="Hello", add_special_tokens=False), metadata=GRPC_AUTH)
    assert list(r.tokens) == tok.encode("Hello", bos=False) and not r.token_strs
    msgs = [pb.ChatMessage(role="user", content="Say hi")]
    r = stub.Tokenize(pb.TokenizeRequest(messages=msgs, model=MODEL_NAME), metadata=GRPC_AUTH)
    assert list(r.tokens) == tok.encode_chat([{"role": "user", "content": "Say hi"}])
    for bad, code in (
        (pb.TokenizeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TokenizeRequest(prompt="a", messages=msgs), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TokenizeRequest(prompt="a", model="gpt-4"), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(bad, metadata=GRPC_AUTH)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(prompt="a"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------------------- parity with HTTP: n, best_of, echo, tools
# The same request over gRPC and over HTTP on the same server (greedy, or seeded) gives the same choices.

SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
HTTP_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME_ARGS}},
]
GRPC_TOOLS = [
    pb.Tool(type="function", function=pb.Function(name=t["function"]["name"], description=t["function"]["description"],
                                                  parameters=json.dumps(t["function"]["parameters"])))
    for t in HTTP_TOOLS
]  # fmt: skip
QUESTION = "What is the weather in Paris, and what time is it?"
USER = [{"role": "user", "content": QUESTION}]
GRPC_USER = [pb.ChatMessage(role="user", content=QUESTION)]


@pytest.fixture(scope="module")
def http(served):
    base, _, _ = served

    def call(path: str, body: dict[str, Any]) -> httpx.Response:
        return post(base, path, {"model": MODEL_NAME, **body}, timeout=300)

    return call


def f32(x: float) -> float:
    """A float as a proto ``float`` field carries it."""
    return float(np.float32(x))


# Two runs of the same request are batched with different neighbours, and a row's logits may then differ in the last
# float32 bit (the chosen tokens do not): logprob values are compared to this absolute tolerance, everything else
# exactly.
LOGPROB_TOL = 1e-4


def assert_same_logprobs(got: Any, expected: Any) -> None:
    """Equal structures (lists, dicts, strings, None) whose floats agree within LOGPROB_TOL."""
    if isinstance(expected, float):
        assert isinstance(got, float) and got == pytest.approx(expected, abs=LOGPROB_TOL), (got, expected)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), (got, expected)
        for g, e in zip(got, expected, strict=True):
            assert_same_logprobs(g, e)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), (got, expected)
        for k in expected:
            assert_same_logprobs(got[k], expected[k])
    else:
        assert got == expected


def grpc_completion_logprobs(prompt_lps: Any, lps: Any) -> dict[str, list[Any]]:
    """A gRPC choice's prompt_logprobs then logprobs in the HTTP completions shape (tokens, token_logprobs,
    top_logprobs), values as float32."""
    all_lps = [*prompt_lps, *lps]
    return {
        "tokens": [lp.token for lp in all_lps],
        "token_logprobs": [lp.logprob if lp.HasField("logprob") else None for lp in all_lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} if lp.HasField("logprob") else None for lp in all_lps],
    }


def http_completion_logprobs(lp: dict[str, Any]) -> dict[str, list[Any]]:
    return {
        "tokens": lp["tokens"],
        "token_logprobs": [None if v is None else f32(v) for v in lp["token_logprobs"]],
        "top_logprobs": [None if t is None else {k: f32(v) for k, v in t.items()} for t in lp["top_logprobs"]],
    }


def assembled(replies: list[Any]) -> dict[int, dict[str, Any]]:
    """GenerateStream replies put together per choice, as a client does: text, token ids, logprobs, finish reason,
    and the tool calls (by index: id, type and name from the first piece, the arguments joined)."""
    out: dict[int, dict[str, Any]] = {}
    for r in replies:
        c = out.setdefault(r.index, {"text": "", "token_ids": [], "logprobs": [], "prompt_logprobs": [], "calls": {},
                                     "finish_reason": "", "prompt_token_ids": None})  # fmt: skip
        assert not c["finish_reason"], "a reply after the choice finished"
        c["text"] += r.text
        c["token_ids"] += list(r.token_ids)
        c["logprobs"] += list(r.logprobs)
        c["finish_reason"] = r.finish_reason
        if r.prompt_token_ids:
            assert c["prompt_token_ids"] is None, "prompt ids twice"
            c["prompt_token_ids"] = list(r.prompt_token_ids)
            c["prompt_logprobs"] = list(r.prompt_logprobs)
        for piece in r.tool_calls:
            if piece.index not in c["calls"]:
                assert piece.id and piece.type == "function" and piece.function.name, piece
                c["calls"][piece.index] = {"id": piece.id, "type": piece.type, "name": piece.function.name,
                                           "arguments": ""}  # fmt: skip
            else:
                assert not piece.id and not piece.function.name, piece
            c["calls"][piece.index]["arguments"] += piece.function.arguments
    return out


def test_n_completions_match_http(stub, http):
    r = stub.Generate(pb.GenerateRequest(prompt="Hello there", n=3, seed=7, temperature=1, max_tokens=8, logprobs=1),
                      metadata=GRPC_AUTH)  # fmt: skip
    h = http("/v1/completions", {"prompt": "Hello there", "n": 3, "seed": 7, "temperature": 1, "max_tokens": 8,
                                 "logprobs": 1}).json()  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c["text"] for c in h["choices"]]
    assert len({c.text for c in r.choices}) > 1  # seed + i per choice: different samples
    assert [c.finish_reason for c in r.choices] == [c["finish_reason"] for c in h["choices"]]
    for c, hc in zip(r.choices, h["choices"], strict=True):
        assert_same_logprobs(grpc_completion_logprobs([], c.logprobs), http_completion_logprobs(hc["logprobs"]))
    assert (r.text, list(r.token_ids), r.index) == (r.choices[0].text, list(r.choices[0].token_ids), 0)
    assert [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens] == [
        h["usage"]["prompt_tokens"], h["usage"]["completion_tokens"], h["usage"]["total_tokens"]
    ]  # fmt: skip
    stream = assembled(
        list(
            stub.GenerateStream(
                pb.GenerateRequest(prompt="Hello there", n=3, seed=7, temperature=1, max_tokens=8), metadata=GRPC_AUTH
            )
        )  # fmt: skip
    )
    assert sorted(stream) == [0, 1, 2]
    for c in r.choices:
        s = stream[c.index]
        assert (s["text"], s["token_ids"], s["finish_reason"]) == (c.text, list(c.token_ids), c.finish_reason)
        assert s["prompt_token_ids"] == list(r.prompt_token_ids)


def test_n_chat_matches_http(stub, http):
    r = stub.Generate(pb.GenerateRequest(messages=GRPC_USER, n=2, seed=3, temperature=1, max_tokens=10, logprobs=2),
                      metadata=GRPC_AUTH)  # fmt: skip
    h = http("/v1/chat/completions", {"messages": USER, "n": 2, "seed": 3, "temperature": 1, "max_tokens": 10,
                                      "logprobs": True, "top_logprobs": 2}).json()  # fmt: skip
    assert [c.text for c in r.choices] == [c["message"]["content"] for c in h["choices"]]
    assert [c.finish_reason for c in r.choices] == [c["finish_reason"] for c in h["choices"]]
    for c, hc in zip(r.choices, h["choices"], strict=True):
        assert_same_logprobs(
            [(lp.token, lp.logprob, [(t.token, t.logprob) for t in lp.top]) for lp in c.logprobs],
            [
                (lp["token"], f32(lp["logprob"]), [(t["token"], f32(t["logprob"])) for t in lp["top_logprobs"]])
                for lp in hc["logprobs"]["content"]
            ],
        )
        assert not c.tool_calls
    assert r.usage.completion_tokens == h["usage"]["completion_tokens"]


def test_best_of_matches_http(stub, http):
    body = {"prompt": "The city of", "n": 2, "best_of": 5, "seed": 11, "temperature": 1, "max_tokens": 6}
    h = http("/v1/completions", {**body, "logprobs": 0}).json()
    r = stub.Generate(pb.GenerateRequest(prompt="The city of", n=2, best_of=5, seed=11, temperature=1, max_tokens=6,
                                         logprobs=0), metadata=GRPC_AUTH)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [c["text"] for c in h["choices"]]
    for c, hc in zip(r.choices, h["choices"], strict=True):
        assert_same_logprobs(grpc_completion_logprobs([], c.logprobs), http_completion_logprobs(hc["logprobs"]))
    sums = [sum(lp.logprob for lp in c.logprobs) for c in r.choices]
    assert sums == sorted(sums, reverse=True)  # best first
    assert r.usage.completion_tokens == h["usage"]["completion_tokens"]  # all 5 candidates count
    # without logprobs: the same two choices, no logprobs in the reply
    plain = stub.Generate(pb.GenerateRequest(prompt="The city of", n=2, best_of=5, seed=11, temperature=1,
                                             max_tokens=6), metadata=GRPC_AUTH)  # fmt: skip
    assert [c.text for c in plain.choices] == [c.text for c in r.choices]
    assert all(not c.logprobs for c in plain.choices)


def test_echo_with_prompt_logprobs_matches_http(stub, http, reference_llm):
    prompt = "Once upon a time"
    h = http("/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2, "temperature": 0,
                                 "max_tokens": 5}).json()["choices"][0]  # fmt: skip
    request = pb.GenerateRequest(prompt=prompt, echo=True, logprobs=2, temperature=0, max_tokens=5)
    r = stub.Generate(request, metadata=GRPC_AUTH)
    ids = reference_llm.tokenizer.encode(prompt)
    assert list(r.prompt_token_ids) == ids and len(r.prompt_logprobs) == len(ids)
    assert r.text == h["text"] and r.text.startswith(prompt)
    assert not r.prompt_logprobs[0].HasField("logprob") and not r.prompt_logprobs[0].top
    assert [lp.token_id for lp in r.prompt_logprobs] == ids
    assert_same_logprobs(
        grpc_completion_logprobs(r.prompt_logprobs, r.logprobs), http_completion_logprobs(h["logprobs"])
    )
    (s,) = assembled(list(stub.GenerateStream(request, metadata=GRPC_AUTH))).values()
    assert s["text"] == r.text and s["token_ids"] == list(r.token_ids)
    assert_same_logprobs(
        grpc_completion_logprobs(s["prompt_logprobs"], s["logprobs"]),
        grpc_completion_logprobs(r.prompt_logprobs, r.logprobs),
    )
    # echo without logprobs: the prompt's text, no prompt logprobs
    bare = stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, echo=True, temperature=0, max_tokens=5),
                         metadata=GRPC_AUTH)  # fmt: skip
    h2 = http("/v1/completions", {"prompt": ids, "echo": True, "temperature": 0, "max_tokens": 5}).json()
    assert bare.text == h2["choices"][0]["text"] == r.text and not bare.prompt_logprobs and not bare.logprobs


def _grpc_calls(calls: Any) -> list[tuple[str, str, str]]:
    return [(c.type, c.function.name, c.function.arguments) for c in calls]


def _http_calls(message: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]


NAMED_GRPC = pb.ToolChoice(function="get_weather")
NAMED_HTTP = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("grpc_choice", "http_choice", "seed"),
    [(NAMED_GRPC, NAMED_HTTP, 31), (pb.ToolChoice(mode="required"), "required", 32)],
    ids=["named", "required"],
)
def test_tool_calls_match_http_and_validate(stub, http, grpc_choice, http_choice, seed):
    request = pb.GenerateRequest(messages=GRPC_USER, tools=GRPC_TOOLS, tool_choice=grpc_choice, n=2, seed=seed,
                                 temperature=1, max_tokens=160)  # fmt: skip
    r = stub.Generate(request, metadata=GRPC_AUTH)
    h = http("/v1/chat/completions", {"messages": USER, "tools": HTTP_TOOLS, "tool_choice": http_choice, "n": 2,
                                      "seed": seed, "temperature": 1, "max_tokens": 160}).json()  # fmt: skip
    assert [_grpc_calls(c.tool_calls) for c in r.choices] == [_http_calls(c["message"]) for c in h["choices"]]
    assert [c.finish_reason for c in r.choices] == [c["finish_reason"] for c in h["choices"]] == ["tool_calls"] * 2
    assert [c.text for c in r.choices] == ["", ""] and [c["message"]["content"] for c in h["choices"]] == [None, None]
    for c in r.choices:
        assert c.tool_calls and [k.index for k in c.tool_calls] == list(range(len(c.tool_calls)))
        assert len({k.id for k in c.tool_calls}) == len(c.tool_calls) and all(k.id for k in c.tool_calls)
        for k in c.tool_calls:
            jsonschema.validate(json.loads(k.function.arguments), SCHEMAS[k.function.name])
        if grpc_choice is NAMED_GRPC:
            assert [k.function.name for k in c.tool_calls] == ["get_weather"]
    # streamed: the pieces assemble into the same calls, one choice at a time
    stream = assembled(list(stub.GenerateStream(request, metadata=GRPC_AUTH)))
    for c in r.choices:
        s = stream[c.index]
        whole = [{"id": k.id, "type": k.type, "name": k.function.name, "arguments": k.function.arguments}
                 for k in c.tool_calls]  # fmt: skip
        assert [{**v, "id": ""} for _, v in sorted(s["calls"].items())] == [{**w, "id": ""} for w in whole]
        assert (s["text"], s["finish_reason"], s["token_ids"]) == ("", "tool_calls", list(c.token_ids))


def test_tool_choice_none_and_tool_history_match_http(stub, http):
    r = stub.Generate(pb.GenerateRequest(messages=GRPC_USER, tools=GRPC_TOOLS, tool_choice=pb.ToolChoice(mode="none"),
                                         temperature=0, max_tokens=8), metadata=GRPC_AUTH)  # fmt: skip
    h = http("/v1/chat/completions", {"messages": USER, "tools": HTTP_TOOLS, "tool_choice": "none", "temperature": 0,
                                      "max_tokens": 8}).json()  # fmt: skip
    assert r.text == h["choices"][0]["message"]["content"] and not r.tool_calls
    assert r.finish_reason == h["choices"][0]["finish_reason"]
    # A conversation with an earlier call and its result: the v1 chat format (mistral-common's v1 tokenizer) has no
    # place for them, so both APIs refuse it, naming messages.
    args = '{"city": "Paris", "unit": "celsius"}'
    grpc_history = [
        *GRPC_USER,
        pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_1", type="function",
                                                                 function=pb.FunctionCall(name="get_weather",
                                                                                          arguments=args))]),
        pb.ChatMessage(role="tool", tool_call_id="call_1", name="get_weather", content="sunny"),
    ]  # fmt: skip
    http_history = [
        *USER,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ]  # fmt: skip
    h = http("/v1/chat/completions", {"messages": http_history, "max_tokens": 4})
    assert h.status_code == 400 and h.json()["error"]["param"] == "messages"
    message = h.json()["error"]["message"]
    assert message.startswith("message 1: an assistant message with tool_calls: ")
    assert "Tools not implemented for tokenizer V1" in message
    for method in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as info:
            list_if_stream(getattr(stub, method)(pb.GenerateRequest(messages=grpc_history, max_tokens=4),
                                                 metadata=GRPC_AUTH))  # fmt: skip
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == message


def list_if_stream(result: Any) -> Any:
    return result if isinstance(result, pb.GenerateReply) else list(result)


def test_tokenize_with_tools_matches_http(stub, served):
    base, _, _ = served
    h = post(base, "/tokenize", {"messages": USER, "tools": HTTP_TOOLS})
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(messages=GRPC_USER, tools=GRPC_TOOLS), metadata=GRPC_AUTH)
    assert h.status_code == 400 and h.json()["error"]["param"] == "tools"  # v1: no place for tools
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == h.json()["error"]["message"]


# (name, gRPC request, the HTTP path and body of the same request or None where HTTP has no such request, param)
_P = {"prompt": "a", "max_tokens": 2}
_C = {"messages": USER, "max_tokens": 2}
BAD_PARITY = [
    ("n 0", pb.GenerateRequest(prompt="a", max_tokens=2, n=0), ("/v1/completions", {**_P, "n": 0}), "n"),
    ("n 129", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, n=129),
     ("/v1/chat/completions", {**_C, "n": 129}), "n"),
    ("best_of < n", pb.GenerateRequest(prompt="a", max_tokens=2, n=3, best_of=2),
     ("/v1/completions", {**_P, "n": 3, "best_of": 2}), "best_of"),
    ("best_of 129", pb.GenerateRequest(prompt="a", max_tokens=2, best_of=129),
     ("/v1/completions", {**_P, "best_of": 129}), "best_of"),
    ("best_of in a stream", pb.GenerateRequest(prompt="a", max_tokens=2, best_of=2),
     ("/v1/completions", {**_P, "best_of": 2, "stream": True}), "best_of"),
    ("echo with messages", pb.GenerateRequest(messages=GRPC_USER, echo=True), None, "echo"),
    ("best_of with messages", pb.GenerateRequest(messages=GRPC_USER, best_of=2), None, "best_of"),
    ("tools with a prompt", pb.GenerateRequest(prompt="a", tools=GRPC_TOOLS), None, "tools"),
    ("tool_choice with a prompt", pb.GenerateRequest(prompt="a", tool_choice=NAMED_GRPC), None, "tool_choice"),
    ("auto on v1", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tools=GRPC_TOOLS),
     ("/v1/chat/completions", {**_C, "tools": HTTP_TOOLS}), "tool_choice"),
    ("required without tools", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2,
                                                  tool_choice=pb.ToolChoice(mode="required")),
     ("/v1/chat/completions", {**_C, "tool_choice": "required"}), "tool_choice"),
    ("unknown mode", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tools=GRPC_TOOLS,
                                        tool_choice=pb.ToolChoice(mode="sometimes")),
     ("/v1/chat/completions", {**_C, "tools": HTTP_TOOLS, "tool_choice": "sometimes"}), "tool_choice"),
    ("function not among the tools", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tools=GRPC_TOOLS,
                                                        tool_choice=pb.ToolChoice(function="nope")),
     ("/v1/chat/completions", {**_C, "tools": HTTP_TOOLS, "tool_choice": {"type": "function",
                                                                          "function": {"name": "nope"}}}),
     "tool_choice"),
    ("bad function name", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tool_choice=NAMED_GRPC,
                                             tools=[pb.Tool(function=pb.Function(name="get weather"))]),
     ("/v1/chat/completions", {**_C, "tool_choice": NAMED_HTTP,
                               "tools": [{"type": "function", "function": {"name": "get weather"}}]}),
     "tools.0.function.name"),
    ("parameters not JSON", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tool_choice=NAMED_GRPC,
                                               tools=[pb.Tool(function=pb.Function(name="get_weather",
                                                                                   parameters="{nope"))]),
     None, "tools.0.function.parameters"),
    ("bad parameters schema", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tool_choice=NAMED_GRPC,
                                                 tools=[pb.Tool(function=pb.Function(name="get_weather",
                                                                                     parameters='{"type": 5}'))]),
     ("/v1/chat/completions", {**_C, "tool_choice": NAMED_HTTP,
                               "tools": [{"type": "function",
                                          "function": {"name": "get_weather", "parameters": {"type": 5}}}]}),
     "tools"),
    ("tools and json_object", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, tools=GRPC_TOOLS,
                                                 tool_choice=pb.ToolChoice(mode="required"), json_object=True),
     None, "tools"),
    ("tool message without an id", pb.GenerateRequest(messages=[*GRPC_USER, pb.ChatMessage(role="tool", content="x")]),
     ("/v1/chat/completions", {**_C, "messages": [*USER, {"role": "tool", "content": "x"}]}), "messages.1"),
    ("top logprobs 21", pb.GenerateRequest(messages=GRPC_USER, max_tokens=2, logprobs=21),
     ("/v1/chat/completions", {**_C, "logprobs": True, "top_logprobs": 21}), "logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "request_", "same_http", "param"), BAD_PARITY, ids=[b[0] for b in BAD_PARITY])
def test_bad_values_are_invalid_argument_naming_the_param(stub, http, name, request_, same_http, param):
    method = "GenerateStream" if name == "best_of in a stream" else "Generate"
    with pytest.raises(grpc.RpcError) as info:
        list_if_stream(getattr(stub, method)(request_, metadata=GRPC_AUTH))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert param in details, details
    if same_http is not None:
        h = http(*same_http)
        assert h.status_code == 400 and h.json()["error"]["param"] == param
        assert details == h.json()["error"]["message"]


def test_http_body_of_a_tool_conversation():
    # What the v3+ chat formats encode (the served v1 model refuses it): a call, its result, tools, tool_choice.
    args = '{"city": "Paris", "unit": "celsius"}'
    request = pb.GenerateRequest(
        messages=[
            pb.ChatMessage(role="system", content="Use tools."),
            *GRPC_USER,
            pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="abcdefghi", function=pb.FunctionCall(
                name="get_weather", arguments=args))]),
            pb.ChatMessage(role="tool", tool_call_id="abcdefghi", name="get_weather", content="sunny"),
        ],
        tools=GRPC_TOOLS[:1] + [pb.Tool(function=pb.Function(name="get_time"))],
        tool_choice=pb.ToolChoice(mode="auto"),
        parallel_tool_calls=False,
        n=2,
        logprobs=3,
        seed=5,
    )  # fmt: skip
    assert http_body(request, stream=True) == {  # no max_tokens: with messages, what is left of the context
        "n": 2,
        "seed": 5,
        "stream": True,
        "messages": [
            {"role": "system", "content": "Use tools."},
            *USER,
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "abcdefghi", "type": "function",
                             "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "abcdefghi", "name": "get_weather"},
        ],
        "tools": [HTTP_TOOLS[0], {"type": "function", "function": {"name": "get_time"}}],
        "logprobs": True,
        "top_logprobs": 3,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
    }  # fmt: skip
