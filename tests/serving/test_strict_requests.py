"""Requests are strict: the sampling fields work (same tokens as the offline API with the same SamplingParams),
an unknown field is a 400 naming it, fields this server does not have are refused by name, and the documented
OpenAI fields that have no effect here are accepted. With the official `openai` client and raw httpx."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from cluster import SamplingParams
from cluster.serve.ingress.openai_api.protocol import NO_EFFECT
from tests.serving.helpers import API_KEY, MODEL_NAME, post

pytestmark = [pytest.mark.ray, pytest.mark.serving]
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(served):
    base, _, _ = served
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


SAMPLING = [
    ({"presence_penalty": 1.5, "frequency_penalty": 0.7}, {}),
    ({"temperature": 0.8, "seed": 11}, {"repetition_penalty": 1.3, "min_p": 0.05, "top_k": 50}),
    ({}, {"min_tokens": 12, "stop_token_ids": [2]}),
    ({"logit_bias": {"1000": 100}}, {}),
]


@pytest.mark.parametrize(("openai_kwargs", "extra_body"), SAMPLING, ids=["penalties", "vllm-extras", "min-tokens",
                                                                          "logit-bias"])  # fmt: skip
def test_sampling_fields_reach_the_engine(client, reference_llm, openai_kwargs, extra_body):
    kwargs = {"temperature": 0, **openai_kwargs}
    bias = tuple((int(k), float(v)) for k, v in kwargs.get("logit_bias", {}).items())
    params = SamplingParams(max_tokens=12, **{**kwargs, "logit_bias": bias}, **extra_body)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, extra_body=extra_body, **kwargs)
    ref = reference_llm.generate(PROMPT, params)[0]
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    if bias:  # +100 on one token: greedy picks it every time
        assert ref.token_ids == [1000] * 12
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, extra_body=extra_body,
                                          **kwargs)  # fmt: skip
    ids = reference_llm.tokenizer.encode_chat(CHAT)
    assert chat.choices[0].message.content == reference_llm.generate([ids], params)[0].text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"logit_bias": {"12": 101}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"logit_bias": {"12": "high"}}, "logit_bias.12"),
        ({"temperature": 1e-40}, None),  # accepted: below 1e-5 is greedy
    ],
)
def test_sampling_values_out_of_range_are_400_naming_them(served, body, param):
    base, _, _ = served
    r = post(base, "/v1/completions", {"prompt": "x", "max_tokens": 5, **body})
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


UNKNOWN = [
    ("/v1/completions", {"prompt": "x", "frobnicate": True}, "frobnicate", "unknown field"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x", "unknown field"),
    ("/v1/chat/completions", {"messages": CHAT, "temprature": 0.5}, "temprature", "unknown field"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "weight": 1}]}, "messages.0.weight",
     "unknown field"),
    # refused by name: fields this server does not have, or values that do not go together
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type",
     "json_schema"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tool_choice", "tool_choice 'auto'"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ("/v1/chat/completions", {"messages": CHAT, "guided_json": {"type": "object"}, "guided_regex": "a"},
     "guided_regex", "only one"),
    ("/v1/completions", {"prompt": "x", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend",
     "llguidance"),
    ("/v1/chat/completions", {"messages": CHAT, "use_beam_search": True}, "use_beam_search", "beam search"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0",
     "only assistant"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
    ("/v1/chat/completions", {"messages": [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages", "v1"),  # the v1 format has no tools
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0", "only 'text'"),
    ("/v1/chat/completions", {"messages": CHAT, "modalities": ["text", "audio"]}, "modalities.1", "text"),
    ("/v1/chat/completions", {"messages": CHAT, "audio": {"voice": "x"}}, "audio", "audio"),
    ("/v1/chat/completions", {"messages": CHAT, "functions": []}, "functions", "function calling"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "suffix"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param", "needle"), UNKNOWN, ids=[u[2] for u in UNKNOWN])
def test_unknown_and_unsupported_fields_are_400_naming_them(served, path, body, param, needle):
    base, _, _ = served
    r = post(base, path, {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert needle.lower() in err["message"].lower()


def test_openai_client_sees_the_unknown_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2, extra_body={"best_of_n": 3})
    assert info.value.body["param"] == "best_of_n"


def test_fields_without_effect_are_accepted(client, reference_llm):
    assert "user" in NO_EFFECT and "metadata" in NO_EFFECT
    ids = reference_llm.tokenizer.encode_chat(CHAT)
    ref = reference_llm.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{**CHAT[0], "name": "alice"}],
        max_tokens=6,
        temperature=0,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        modalities=["text"],
        tool_choice="none",
        response_format={"type": "text"},
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in r if c.choices) == ref.text
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, user="u-2")
    assert r.usage.completion_tokens == 2


def test_developer_role_is_a_system_message(client, reference_llm):
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = reference_llm.tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, msgs[1]])
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert (
        r.choices[0].message.content
        == reference_llm.generate([ids], SamplingParams(max_tokens=4, temperature=0))[0].text
    )
