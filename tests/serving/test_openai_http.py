"""The OpenAI API over real HTTP, with the `openai` client and raw httpx: same tokens as LLM.generate."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import OpenAI

from cluster import SamplingParams
from cluster.serve.ingress.openai_api.responses import (
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorResponse,
    ModelList,
)
from tests.helpers import wait_until
from tests.serving.helpers import ALIAS, API_KEY, MODEL_NAME, metric

pytestmark = [pytest.mark.ray, pytest.mark.serving]


@pytest.fixture(scope="module")
def client(served):
    base, _, _ = served
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME, ALIAS]  # every served name; responses report the first


def test_completion_matches_llm(client, reference_llm):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0)
    ref = reference_llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0))[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_matches_llm(client, reference_llm):
    prompt = "Once upon a time"
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = reference_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].choices == []


def test_chat_matches_llm(client, reference_llm):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    ids = reference_llm.tokenizer.encode_chat(messages)
    ref = reference_llm.generate([ids], SamplingParams(max_tokens=16, temperature=0))[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == ref.text


def test_n_seed_logprobs_and_stop(client, reference_llm):
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=8, temperature=0.9, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=8, temperature=0.9, n=3, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    assert all(len(top) == 3 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    for _tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)
    full = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:6]
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL_NAME, prompt="Hi", max_tokens=4, temperature=0, extra_body={"top_k": 1, "ignore_eos": True}
    )
    assert r.usage.completion_tokens == 4


def _post(base, path, body, *, key=API_KEY, raw=None):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(f"{base}{path}", content=content, headers=headers, timeout=60)


LONG_PROMPT = "hello " * 4100

BAD_INPUTS = [
    ("malformed json", "/v1/completions", None, "{not json", None, 400, "not valid JSON"),
    ("body not an object", "/v1/completions", None, "[1, 2]", None, 400, "JSON object"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, None, None, 400, "max_tokens"),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, None, None, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, None, None, 400, "empty"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, None, None, 400, "max_tokens"),
    ("temperature < 0", "/v1/completions", {"prompt": "x", "temperature": -0.5}, None, None, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0}, None, None, 400, "top_p"),
    ("top_p above one", "/v1/completions", {"prompt": "x", "top_p": 1.5}, None, None, 400, "top_p"),
    ("n too large", "/v1/completions", {"prompt": "x", "n": 129}, None, None, 400, "n must be an integer in [1, 128]"),
    ("prompt too long", "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, None, None, 400, "context"),
    ("prompt+max_tokens too long", "/v1/completions", {"prompt": "x", "max_tokens": 5000}, None, None, 400, "4096"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, None, None, 404, "does not exist"),
    ("missing API key", "/v1/completions", {"prompt": "x"}, None, "none", 401, "missing API key"),
    ("wrong API key", "/v1/completions", {"prompt": "x"}, None, "wrong", 401, "invalid API key"),
    (
        "chat bad role order",
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "content": "x"}]},
        None,
        None,
        400,
        "message",
    ),
    ("chat empty messages", "/v1/chat/completions", {"messages": []}, None, None, 400, "messages"),
    (
        "chat unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        None,
        None,
        400,
        "role",
    ),
    (
        "tools malformed",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        None,
        None,
        400,
        "tools",
    ),
    ("unknown path", "/v1/nothing", {}, None, None, 404, ""),
]


@pytest.mark.parametrize(
    ("name", "path", "body", "raw", "key", "status", "needle"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs(served, name, path, body, raw, key, status, needle):
    base, _, _ = served
    key = {None: API_KEY, "none": None, "wrong": "nope"}[key]
    r = _post(base, path, body, key=key, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert needle.lower() in err["message"].lower()
    assert "Traceback" not in r.text


def test_disconnect_mid_stream_frees_the_slot(served):
    base, _, _ = served
    body = {"prompt": "a long story", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held, so the connection stays open while we look at the server
        events = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(events) >= 3
        assert metric(base, "mixserve:num_requests_running") == 1
        before = metric(base, "mixserve:generation_tokens_total")
        wait_until(
            lambda: metric(base, "mixserve:generation_tokens_total") > before,
            "the request stopped generating while its client was still connected",
        )
    # The client is gone: the request is aborted and its slot freed long before 3000 tokens could finish.
    wait_until(
        lambda: metric(base, "mixserve:num_requests_running") == 0,
        "the request kept running after the client disconnected",
        timeout_s=15,
    )
    stopped_at = metric(base, "mixserve:generation_tokens_total")
    time.sleep(0.5)  # nothing runs any more: the count stays where it stopped
    assert metric(base, "mixserve:generation_tokens_total") == stopped_at


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _schema_ref(content: dict, media_type: str) -> str:
    return content[media_type]["schema"]["$ref"].rsplit("/", 1)[-1]


def test_openapi_documents_requests_responses_stream_chunks_and_errors(served):
    base, _, _ = served
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    for name in (
        "CompletionRequest",
        "ChatCompletionRequest",
        "CompletionResponse",
        "CompletionChoice",
        "CompletionLogprobs",
        "CompletionStreamResponse",
        "ChatCompletionResponse",
        "ChatMessage",
        "ChatLogprobs",
        "ChatCompletionStreamResponse",
        "ChatDelta",
        "Usage",
        "ModelList",
        "ModelCard",
        "ErrorResponse",
        "HealthResponse",
        "TokenizeCompletionRequest",
        "TokenizeChatRequest",
        "TokenizeResponse",
        "DetokenizeRequest",
        "DetokenizeResponse",
        "VersionResponse",
    ):
        assert name in schemas, name
    for ref in _refs(spec):  # every reference resolves
        assert ref.rsplit("/", 1)[-1] in schemas, ref
    for path, request, response, chunk in (
        ("/v1/completions", "CompletionRequest", "CompletionResponse", "CompletionStreamResponse"),
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionStreamResponse"),
    ):
        op = spec["paths"][path]["post"]
        assert _schema_ref(op["requestBody"]["content"], "application/json") == request
        assert _schema_ref(op["responses"]["200"]["content"], "application/json") == response
        assert _schema_ref(op["responses"]["200"]["content"], "text/event-stream") == chunk
        for status in ("400", "401", "404", "408", "413", "500", "503"):
            assert _schema_ref(op["responses"][status]["content"], "application/json") == "ErrorResponse"
    models = spec["paths"]["/v1/models"]["get"]["responses"]
    assert _schema_ref(models["200"]["content"], "application/json") == "ModelList"


def test_responses_are_what_the_schemas_say(served):
    """What the routes send parses strictly as the documented models (no field missing, none extra)."""
    base, _, _ = served
    headers = {"authorization": f"Bearer {API_KEY}"}

    def strict(model, data):
        assert set(data) <= set(model.model_fields), set(data) - set(model.model_fields)
        return model.model_validate(data)

    strict(ModelList, httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json())
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    strict(CompletionResponse, _post(base, "/v1/completions", body).json())
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 1}
    strict(ChatCompletionResponse, _post(base, "/v1/chat/completions", chat).json())
    strict(ErrorResponse, _post(base, "/v1/completions", {"prompt": ""}).json())
    for path, payload, model in (
        ("/v1/completions", body, CompletionStreamResponse),
        ("/v1/chat/completions", chat, ChatCompletionStreamResponse),
    ):
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        r = _post(base, path, payload)
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [strict(model, json.loads(e)) for e in events[:-1]]
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        assert all(c.usage is None for c in chunks[:-1])


def test_stream_events_stay_on_one_line_for_clients_that_split_with_splitlines(served):
    """Text with U+2028, U+2029 or U+0085 (line breaks to str.splitlines, not to SSE) streams as escaped JSON, so a
    client reading lines with httpx's aiter_lines / iter_lines still gets whole events."""
    base, _, _ = served
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "x", "max_tokens": 12, "temperature": 0, "guided_regex": "(\u2028|\u2029|\x85)ab(\u2028)"}
    whole = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60).json()
    text = whole["choices"][0]["text"]
    assert text[1:] == "ab\u2028" and text[0] in "\u2028\u2029\x85"
    streamed = ""
    with httpx.stream(
        "POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += "".join(ch["text"] for ch in json.loads(line[6:])["choices"])
    assert streamed == text


def test_echo_with_logprobs_scores_the_prompt_like_the_model(client, reference_llm):
    """echo + logprobs: the prompt's tokens come first, each with its log-probability given the ones before it
    (none for the first), equal to log_softmax of the offline model's logits; streamed the same as whole."""
    import torch

    prompt = [1, 415, 2936, 9060, 285, 1142]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = torch.log_softmax(reference_llm.logits(prompt).double(), dim=-1)
    for p in range(1, len(prompt)):
        assert abs(lp.token_logprobs[p] - ref[p - 1, prompt[p]].item()) < 1e-4
        assert len(lp.top_logprobs[p]) == 2
    out = reference_llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    assert r.choices[0].text == reference_llm.tokenizer.decode(prompt) + out.text
    stream = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == r.choices[0].text
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_best_of_returns_the_most_likely_candidates(client, reference_llm):
    """best_of 3, n 1: of the three seeded candidates (seed, seed + 1, seed + 2) the one whose tokens have the
    highest summed log-probability, as the offline model scores them."""
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, best_of=3)
    assert len(r.choices) == 1 and r.choices[0].logprobs is None
    cands = reference_llm.generate(
        [prompt] * 3, [SamplingParams(max_tokens=8, temperature=1.0, seed=7 + j, logprobs=0) for j in range(3)]
    )
    best = max(cands, key=lambda o: sum(lp.logprob for lp in o.logprobs or []))
    assert r.choices[0].text == best.text
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in cands)  # every candidate was generated
    for bad in ({"best_of": 2, "n": 3}, {"best_of": 3, "stream": True}):
        with pytest.raises(Exception) as info:
            client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, **bad)
        assert info.value.body["param"] == "best_of"
