"""``tool_choice: "auto"`` end to end over a served model with Mistral's v3 tokenizer, with the official `openai`
client: the tools go into the prompt as mistral-common renders them (``[AVAILABLE_TOOLS]``), and the model's native
output (``[TOOL_CALLS]`` and a JSON list of calls) comes back parsed into ``tool_calls``, whole and streamed. A
random-weight model does not call tools by itself, so a grammar (``guided_grammar``: llguidance's Lark with the
``[TOOL_CALLS]`` control token by id) makes it write the native format; the parsing is what is under test."""

from __future__ import annotations

import json
import shutil
from typing import Any

import jsonschema
import pytest
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool
from openai import OpenAI
from ray import serve

from cluster.serve.app import build_app
from tests.helpers import hf_mixtral
from tests.serving.helpers import API_KEY, WEATHER_ARGS, wait_healthy
from tests.tokenizer_refs import DATA, FILES, reference

pytestmark = [pytest.mark.ray, pytest.mark.serving]
APP = "v3tools"
NAME = "mixtral-v3"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_ARGS}}
]
# One or two calls of get_weather, valid for WEATHER_ARGS, laid out as the v3 format writes them (bounded: a random
# model finishes it well within max_tokens)
_CALL = r'\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", "unit": "(celsius|fahrenheit)"\}\}'
CALLS = rf"/\[{_CALL}(, {_CALL})?\]/"


@pytest.fixture(scope="module")
def client(serve_instance, tmp_path_factory):
    """The openai client of an application serving a v3-tokenizer model (one expert worker)."""
    folder = tmp_path_factory.mktemp("v3tools")
    hf_mixtral(folder, seed=23, vocab_size=32768, max_position_embeddings=1024)
    shutil.copy(DATA / FILES["v3"], folder / "tokenizer.model.v3")  # wins over the v1 tokenizer.model
    args = {
        "model": str(folder),
        "expert_workers": 1,
        "gpus_per_worker": 0,
        "api_key": API_KEY,
        "served_model_name": NAME,
        "max_num_seqs": 4,
        "max_model_len": 1024,
        "request_timeout_s": 120,
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"{serve_instance[0]}/{APP}"
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    try:
        wait_healthy(f"{base}/health")
        yield c
    finally:
        c.close()
        serve.delete(APP)


def native(prefix: str = "") -> dict[str, Any]:
    """A grammar for the v3 native format: optional text, the [TOOL_CALLS] control token (id 5), a list of calls."""
    head = f"{json.dumps(prefix)} " if prefix else ""
    return {"guided_grammar": f"start: {head}<[5]> calls\ncalls: {CALLS}"}


def test_auto_puts_the_tools_in_the_prompt(client):
    r = client.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, max_tokens=4, temperature=0)
    want = reference("v3").encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=USER[0]["content"])], tools=[Tool.from_openai(TOOLS[0])])
    )
    assert r.usage.prompt_tokens == len(want.tokens)
    assert r.choices[0].message.tool_calls is None  # the model wrote no [TOOL_CALLS]: plain content


@pytest.mark.parametrize("prefix", ["", "Let me check."])
def test_auto_parses_the_native_calls_whole_and_streamed(client, prefix):
    args: dict[str, Any] = dict(model=NAME, messages=USER, tools=TOOLS, tool_choice="auto", max_tokens=200)
    r = client.chat.completions.create(**args, n=3, seed=5, extra_body=native(prefix))
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content == (prefix or None)
        assert c.message.tool_calls and all(len(t.id) == 9 and t.type == "function" for t in c.message.tool_calls)
        for call in c.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    whole = client.chat.completions.create(**args, seed=6, extra_body=native(prefix)).choices[0]
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(**args, seed=6, stream=True, extra_body=native(prefix)):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reason = chunk.choices[0].finish_reason or reason
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
    assert (content, reason) == (prefix, "tool_calls")  # the marker and the calls never leak into the content
    assert [calls[i] for i in sorted(calls)] == [
        {"name": t.function.name, "arguments": t.function.arguments} for t in whole.message.tool_calls or []
    ]
