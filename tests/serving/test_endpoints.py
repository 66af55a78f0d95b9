"""The small endpoints (/tokenize, /detokenize, /version, /v1/models/{id}), model aliases, CORS and API keys from an
argument, an environment variable and a file, over real HTTP (httpx and the `openai` client)."""

from __future__ import annotations

from importlib.metadata import version

import httpx
import pytest
from openai import NotFoundError, OpenAI

from cluster import SamplingParams
from cluster.serve.ingress.openai_api.responses import DetokenizeResponse, ModelCard, TokenizeResponse, VersionResponse
from tests.serving.helpers import ALIAS, API_KEY, CORS_ORIGIN, ENV_KEYS, FILE_KEYS, MODEL_NAME, post

pytestmark = [pytest.mark.ray, pytest.mark.serving]
AUTH = {"authorization": f"Bearer {API_KEY}"}


def strict(model, data):
    assert set(data) <= set(model.model_fields), set(data) - set(model.model_fields)
    return model.model_validate(data)


def test_tokenize_prompt_and_chat_match_the_tokenizer(served, reference_llm):
    base, _, _ = served
    tok = reference_llm.tokenizer
    r = post(base, "/tokenize", {"prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = strict(TokenizeResponse, r.json())
    assert body.tokens == tok.encode("Hello world") and body.count == len(body.tokens)
    assert body.max_model_len == 4096
    assert body.token_strs == [tok.id_to_piece(i) for i in body.tokens]
    no_bos = post(base, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False, "model": ALIAS}).json()
    assert no_bos["tokens"] == tok.encode("Hello world", bos=False) and "token_strs" not in no_bos
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = post(base, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tok.encode_chat(messages)
    # the ids a chat completion is prompted with
    done = post(base, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == chat["count"]


def test_detokenize_round_trip(served, reference_llm):
    base, _, _ = served
    ids = reference_llm.tokenizer.encode("The capital of France", bos=False)
    r = post(base, "/detokenize", {"tokens": ids})
    assert r.status_code == 200, r.text
    assert strict(DetokenizeResponse, r.json()).prompt == reference_llm.tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "x", "nope": 1}, 400, "nope"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
         "continue_final_message"),
        ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens.1"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)  # fmt: skip
def test_tokenize_errors(served, path, body, status, param):
    base, _, _ = served
    r = post(base, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_needs_the_key(served):
    base, _, _ = served
    assert post(base, "/tokenize", {"prompt": "x"}, key=None).status_code == 401
    assert post(base, "/detokenize", {"tokens": [1]}, key="wrong").status_code == 401


def test_version_is_open_and_reports_the_package(served):
    base, _, _ = served
    r = httpx.get(f"{base}/version", timeout=30)
    assert r.status_code == 200 and strict(VersionResponse, r.json()).version == version("mixserve")


def test_model_by_id_and_aliases(served, reference_llm):
    base, _, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    for name in (MODEL_NAME, ALIAS):
        card = client.models.retrieve(name)
        assert card.id == name
        strict(ModelCard, httpx.get(f"{base}/v1/models/{name}", headers=AUTH, timeout=30).json())
    with pytest.raises(NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["param"] == "model" and "gpt-4" in info.value.body["message"]
    r = httpx.get(f"{base}/v1/models/org/gpt-4", headers=AUTH, timeout=30)  # ids with a slash reach the route
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # an alias is accepted everywhere; responses report the first served name
    out = client.completions.create(model=ALIAS, prompt="Hi", max_tokens=3, temperature=0)
    ref = reference_llm.generate("Hi", SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.model == MODEL_NAME and out.choices[0].text == ref.text


def test_cors_for_the_configured_origin_only(served):
    base, _, _ = served
    preflight = {"origin": CORS_ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}  # fmt: skip
    r = httpx.options(f"{base}/v1/completions", headers=preflight, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(f"{base}/v1/models", headers={**AUTH, "origin": CORS_ORIGIN}, timeout=30)
    assert r.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = httpx.options(f"{base}/v1/completions", headers={**preflight, "origin": "https://evil.example"}, timeout=30)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = httpx.get(f"{base}/v1/models", headers={**AUTH, "origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("key", [API_KEY, *ENV_KEYS, *FILE_KEYS])
def test_keys_from_the_argument_the_environment_and_the_file(served, key):
    base, _, _ = served
    r = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "header",
    [f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", f"Bearer  {API_KEY}", f"Basic {API_KEY}",
     API_KEY, "Bearer env-key-1,env-key-2", "Bearer # one key per line", "Bearer"],
)  # fmt: skip
def test_wrong_or_padded_keys_are_refused(served, header):
    base, _, _ = served
    r = httpx.get(f"{base}/v1/models", headers={"authorization": header}, timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


def test_open_routes_need_no_key(served):
    base, _, _ = served
    for path in ("/health", "/metrics", "/version", "/openapi.json"):
        assert httpx.get(f"{base}{path}", timeout=30).status_code == 200, path
