"""gRPC through Ray Serve's gRPC proxy, with a client generated from our proto."""

from __future__ import annotations

import grpc
import pytest

from cluster import SamplingParams
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from tests.serving.conftest import API_KEY, MODEL_NAME

pytestmark = [pytest.mark.ray, pytest.mark.serving]
AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def stub(served):
    _, target, _ = served
    channel = grpc.insecure_channel(target)
    yield pb_grpc.GenerationStub(channel)
    channel.close()


def test_unary_matches_llm(stub, reference_llm):
    r = stub.Generate(pb.GenerateRequest(prompt="Hello there", max_tokens=16, temperature=0), metadata=AUTH)
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
            metadata=AUTH,
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
    r = stub.Generate(pb.GenerateRequest(messages=msgs, max_tokens=8, temperature=0), metadata=AUTH)
    ids = reference_llm.tokenizer.encode_chat([{"role": "user", "content": "Say hi"}])
    assert list(r.prompt_token_ids) == ids
    assert list(r.token_ids) == reference_llm.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].token_ids


BAD = [
    ("no prompt", pb.GenerateRequest(max_tokens=4), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
    (
        "two prompts",
        pb.GenerateRequest(prompt="a", prompt_token_ids=[1]),
        AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "exactly one",
    ),
    (
        "max_tokens 0",
        pb.GenerateRequest(prompt="a", max_tokens=0),
        AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    ("top_p 2", pb.GenerateRequest(prompt="a", top_p=2.0), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (
        "negative temperature",
        pb.GenerateRequest(prompt="a", temperature=-1),
        AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    ("too long", pb.GenerateRequest(prompt="a", max_tokens=5000), AUTH, grpc.StatusCode.INVALID_ARGUMENT, "4096"),
    (
        "bad token id",
        pb.GenerateRequest(prompt_token_ids=[1, 999999]),
        AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "token ids",
    ),
    (
        "bad chat",
        pb.GenerateRequest(messages=[pb.ChatMessage(role="assistant", content="x")]),
        AUTH,
        grpc.StatusCode.INVALID_ARGUMENT,
        "message",
    ),
    ("unknown model", pb.GenerateRequest(prompt="a", model="gpt-4"), AUTH, grpc.StatusCode.NOT_FOUND, "does not exist"),
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
    r = stub.Generate(pb.GenerateRequest(prompt="a", model=MODEL_NAME, max_tokens=2), metadata=AUTH)
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
    r = stub.Generate(request, metadata=AUTH)
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
                           metadata=AUTH)  # fmt: skip
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
        stub.Generate(request_, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_tokenize(stub, reference_llm):
    tok = reference_llm.tokenizer
    r = stub.Tokenize(pb.TokenizeRequest(prompt="Hello world", return_token_strs=True), metadata=AUTH)
    assert list(r.tokens) == tok.encode("Hello world") and r.count == len(r.tokens) and r.max_model_len == 4096
    assert list(r.token_strs) == [tok.id_to_piece(i) for i in r.tokens]
    r = stub.Tokenize(pb.TokenizeRequest(prompt="Hello", add_special_tokens=False), metadata=AUTH)
    assert list(r.tokens) == tok.encode("Hello", bos=False) and not r.token_strs
    msgs = [pb.ChatMessage(role="user", content="Say hi")]
    r = stub.Tokenize(pb.TokenizeRequest(messages=msgs, model=MODEL_NAME), metadata=AUTH)
    assert list(r.tokens) == tok.encode_chat([{"role": "user", "content": "Say hi"}])
    for bad, code in (
        (pb.TokenizeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TokenizeRequest(prompt="a", messages=msgs), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TokenizeRequest(prompt="a", model="gpt-4"), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(bad, metadata=AUTH)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(prompt="a"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
