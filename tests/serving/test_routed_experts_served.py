"""Routed experts over HTTP (completions and chat, whole and streamed) and gRPC (Generate, GenerateStream): the
[tokens, layers, top_k] expert ids, sent as little-endian int32 (base64 over HTTP), equal transformers' router top-k
for the prompt and every generated token but the last; without ``return_routed_experts`` none are sent. The server
default ``enable_return_routed_experts`` is a flag of ``mixserve serve`` and an application argument."""

from __future__ import annotations

import argparse
import base64
import json

import numpy as np
import pytest

from cluster.config.serving import AppArgs
from cluster.serve.cli import _arguments, add_serve_command
from cluster.serve.proto import mixserve_pb2 as pb
from tests.serving.helpers import GRPC_AUTH, post
from tests.serving.references import hf_causal, hf_routed

pytestmark = [pytest.mark.ray, pytest.mark.serving]

PROMPT = [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837, 1236, 298]
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
AS_IDS = {"logprobs": 0, "return_tokens_as_token_ids": True}  # the generated ids, from the logprobs


@pytest.fixture(scope="module")
def model(served):
    return hf_causal(served[2])


def decoded(choice: dict) -> np.ndarray:
    shape = choice["routed_experts_shape"]
    return np.frombuffer(base64.b64decode(choice["routed_experts"]), dtype="<i4").reshape(shape)


def token_id(piece: str) -> int:
    return int(piece.removeprefix("token_id:"))


def sse(text: str) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(e) for e in lines[:-1]]


def test_completions_whole_and_streamed(served, model):
    base, _, _ = served
    body = {"prompt": PROMPT, **GREEDY, **AS_IDS, "return_routed_experts": True}
    r = post(base, "/v1/completions", body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    out = [token_id(t) for t in choice["logprobs"]["tokens"]]
    want = hf_routed(model, PROMPT + out[:-1])
    assert choice["routed_experts_shape"] == [len(PROMPT) + 5, model.config.num_hidden_layers, 2]
    np.testing.assert_array_equal(decoded(choice), want)
    chunks = sse(post(base, "/v1/completions", {**body, "stream": True}).text)
    routed = [c["choices"][0] for c in chunks if "routed_experts" in c["choices"][0]]
    assert len(routed) == 1 and routed[0]["finish_reason"] == "length"  # on the final chunk only
    np.testing.assert_array_equal(decoded(routed[0]), want)
    plain = post(base, "/v1/completions", {"prompt": PROMPT, **GREEDY}).json()["choices"][0]
    assert "routed_experts" not in plain and "routed_experts_shape" not in plain


def test_chat_whole_and_streamed(served, model):
    base, _, _ = served
    messages = [{"role": "user", "content": "Name three colours"}]
    prompt = post(base, "/tokenize", {"messages": messages}).json()["tokens"]
    body = {"messages": messages, **GREEDY, "logprobs": True, "return_tokens_as_token_ids": True}
    r = post(base, "/v1/chat/completions", {**body, "return_routed_experts": True, "n": 2})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:  # greedy: both choices alike
        out = [token_id(t["token"]) for t in choice["logprobs"]["content"]]
        np.testing.assert_array_equal(decoded(choice), hf_routed(model, prompt + out[:-1]))
    chunks = sse(post(base, "/v1/chat/completions", {**body, "stream": True, "return_routed_experts": True}).text)
    out = [token_id(t["token"]) for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("content", [])]
    final = [c["choices"][0] for c in chunks if "routed_experts" in c["choices"][0]]
    assert len(final) == 1 and final[0]["finish_reason"] == "length"
    np.testing.assert_array_equal(decoded(final[0]), hf_routed(model, prompt + out[:-1]))


def grpc_routed(reply) -> np.ndarray:
    return np.frombuffer(reply.routed_experts, dtype="<i4").reshape(list(reply.routed_experts_shape))


def test_grpc_generate_and_stream(stub, model):
    request = pb.GenerateRequest(
        prompt_token_ids=PROMPT, max_tokens=6, temperature=0, ignore_eos=True, return_routed_experts=True
    )
    r = stub.Generate(request, metadata=GRPC_AUTH)
    want = hf_routed(model, PROMPT + list(r.token_ids)[:-1])
    np.testing.assert_array_equal(grpc_routed(r), want)
    np.testing.assert_array_equal(grpc_routed(r.choices[0]), want)
    replies = list(stub.GenerateStream(request, metadata=GRPC_AUTH))
    assert [bool(x.routed_experts) for x in replies] == [False] * (len(replies) - 1) + [True]
    np.testing.assert_array_equal(grpc_routed(replies[-1]), want)
    plain = stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=2), metadata=GRPC_AUTH)
    assert not plain.routed_experts and not plain.routed_experts_shape


def test_server_default_is_a_serve_flag_and_an_app_argument():
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = _arguments(parser.parse_args(["serve", "--enable-return-routed-experts"]))
    assert AppArgs.from_options(args).engine.enable_return_routed_experts
    assert (
        AppArgs.from_options({"enable_return_routed_experts": True})
        .cluster_config()
        .engine.enable_return_routed_experts
    )
    assert not AppArgs.from_options({}).engine.enable_return_routed_experts
