"""Structured output over real HTTP (the official `openai` client) and gRPC, on the shared random-weight model:
whatever the weights, every output follows its schema / regex / choices (checked by jsonschema and re, independent
of the grammar library), and a bad spec is a 400 / INVALID_ARGUMENT naming the field it came from."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from openai import OpenAI

from cluster.serve.proto import mixserve_pb2 as pb
from tests.helpers import SCHEMA
from tests.serving.helpers import API_KEY, GRPC_AUTH, MODEL_NAME, post

pytestmark = [pytest.mark.ray, pytest.mark.serving]
REGEX = r"[a-z]{3}-[0-9]{2}"


@pytest.fixture(scope="module")
def client(served):
    base, _, _ = served
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield c
    c.close()


def test_json_schema_outputs_always_validate(client):
    """50 generations at temperature 1: 5 concurrent requests of n = 10."""
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

    def ask(seed: int):
        return client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Describe person number {seed} as JSON."}],
            response_format=response_format,  # type: ignore[arg-type]
            max_tokens=96,
            temperature=1.0,
            n=10,
            seed=seed,
        )

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(ask, range(5)))
    choices = [c for r in responses for c in r.choices]
    assert len(choices) == 50
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        assert c.message.content is not None
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert len({c.message.content for c in choices}) > 10  # the grammar constrains, the model still chooses


def test_json_object_and_guided_json(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=1.0,
        seed=3,
        n=4,
    )
    for c in r.choices:  # any object is unbounded: it stops as an object or runs out of tokens inside one
        assert c.message.content is not None and c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    for guided in (SCHEMA, json.dumps(SCHEMA)):  # an object or its JSON text, on completions too
        r = client.completions.create(
            model=MODEL_NAME,
            prompt="JSON:",
            max_tokens=96,
            temperature=1.0,
            seed=5,
            n=4,
            extra_body={"guided_json": guided},
        )
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_guided_regex_choice_and_grammar(client):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="Code:",
        max_tokens=32,
        temperature=1.0,
        n=8,
        seed=1,
        extra_body={"guided_regex": REGEX},
    )
    assert all(re.fullmatch(REGEX, c.text) for c in r.choices), [c.text for c in r.choices]
    colours = ["red", "green", "blue"]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "A colour?"}],
        max_tokens=16,
        temperature=1.0,
        n=8,
        seed=2,
        extra_body={"guided_choice": colours},
    )
    assert all(c.message.content in colours and c.finish_reason == "stop" for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="x",
        max_tokens=16,
        temperature=1.0,
        seed=4,
        stream=True,
        extra_body={"guided_grammar": 'start: "x" NUM\nNUM: /[0-9]{1,3}/'},
    )
    assert re.fullmatch(r"x[0-9]{1,3}", "".join(c.choices[0].text for c in stream if c.choices))


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                    },
                }
            },
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"guided_regex": "(unclosed"}, "guided_regex"),
        ("/v1/completions", {"guided_choice": []}, "guided_choice"),
        ("/v1/chat/completions", {"guided_grammar": "start: ???"}, "guided_grammar"),
        ("/v1/chat/completions", {"guided_json": "{not json"}, "guided_json"),
        ("/v1/completions", {"guided_json": {"type": "object", "minProperties": "x"}}, "guided_json"),
        ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_bad_specs_are_400_naming_their_field(served, client, path, body, param):
    base, _, _ = served
    prompt = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = post(base, path, {**prompt, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if path == "/v1/completions":
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=8, extra_body=body)
        assert info.value.body["param"] == param


def test_grpc_structured_output(stub):
    for seed in range(4):
        r = stub.Generate(
            pb.GenerateRequest(
                prompt="JSON:", max_tokens=96, temperature=1.0, seed=seed, json_schema=json.dumps(SCHEMA)
            ),
            metadata=GRPC_AUTH,
        )
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), SCHEMA)
    replies = list(
        stub.GenerateStream(
            pb.GenerateRequest(prompt="Code:", max_tokens=32, temperature=1.0, seed=1, regex=REGEX), metadata=GRPC_AUTH
        )
    )
    assert re.fullmatch(REGEX, "".join(r.text for r in replies))
    r = stub.Generate(
        pb.GenerateRequest(
            prompt="A colour?", max_tokens=8, temperature=1.0, seed=2, choice=pb.Choices(choices=["red", "green"])
        ),
        metadata=GRPC_AUTH,
    )
    assert r.text in ("red", "green")


@pytest.mark.parametrize(
    ("request_fields", "needle"),
    [
        ({"json_schema": "{not json"}, "json_schema"),
        ({"regex": "(unclosed"}, "regex"),
        ({"grammar": "start: ???"}, "grammar"),
    ],
)
def test_grpc_bad_spec_is_invalid_argument(stub, request_fields, needle):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=8, **request_fields), metadata=GRPC_AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (info.value.details() or "")
