"""gRPC Embed and Score on the main application (a causal LM, float32) through Ray Serve's gRPC proxy: embeddings
against transformers' ``MixtralModel`` hidden states, score as their cosine, and the status codes of bad requests
(the field named in the details), as Generate reports them."""

from __future__ import annotations

import grpc
import pytest
import torch

from cluster.serve.proto import mixserve_pb2 as pb
from cluster.text.tokenizer import Tokenizer
from tests.serving.helpers import GRPC_AUTH, metric
from tests.serving.references import hf_causal, hf_embedding, max_diff

pytestmark = [pytest.mark.ray, pytest.mark.serving]

TOL = 1e-4
IDS = [[1, 415, 2936, 9060, 285, 1142], [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837]]


@pytest.fixture(scope="module")
def ref(served):
    _, _, folder = served
    return hf_causal(folder), Tokenizer.from_dir(folder)


def test_embed_texts_and_token_ids(stub, ref):
    model, tok = ref
    texts = ["The capital of France is Paris.", "Mixture of experts"]
    r = stub.Embed(pb.EmbedRequest(input=texts, request_id="grpc-embed-1"), metadata=GRPC_AUTH)
    assert r.request_id == "grpc-embed-1" and [d.index for d in r.data] == [0, 1]
    for d, t in zip(r.data, texts, strict=True):
        assert max_diff(list(d.embedding), hf_embedding(model, tok.encode(t))) < TOL
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(t)) for t in texts)
    ids = [pb.TokenIds(ids=p) for p in IDS]
    r = stub.Embed(pb.EmbedRequest(input_token_ids=ids, pooling="mean", normalize=False), metadata=GRPC_AUTH)
    for d, p in zip(r.data, IDS, strict=True):
        assert max_diff(list(d.embedding), hf_embedding(model, p, "mean", normalize=False)) < TOL


def test_score_is_the_cosine_of_embeddings(stub, ref):
    model, tok = ref
    r = stub.Score(pb.ScoreRequest(text_1=["query text"], text_2=["a document", "another"]), metadata=GRPC_AUTH)
    q = hf_embedding(model, tok.encode("query text"))
    for d, doc in zip(r.data, ["a document", "another"], strict=True):
        assert d.score == pytest.approx(torch.dot(q, hf_embedding(model, tok.encode(doc))).item(), abs=TOL)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD = [
    ("Embed", pb.EmbedRequest(), GRPC_AUTH, INVALID, "input"),
    ("Embed", pb.EmbedRequest(input=["a"], input_token_ids=[pb.TokenIds(ids=[1])]), GRPC_AUTH, INVALID, "input"),
    ("Embed", pb.EmbedRequest(input=["a", ""]), GRPC_AUTH, INVALID, "input"),
    ("Embed", pb.EmbedRequest(input_token_ids=[pb.TokenIds(ids=[1] * 4097)]), GRPC_AUTH, INVALID, "input"),
    ("Embed", pb.EmbedRequest(input=["x"] * 129), GRPC_AUTH, INVALID, "input"),
    ("Embed", pb.EmbedRequest(input=["a"], dimensions=3), GRPC_AUTH, INVALID, "dimensions"),
    ("Embed", pb.EmbedRequest(input=["a"], pooling="max"), GRPC_AUTH, INVALID, "pooling"),
    ("Embed", pb.EmbedRequest(input=["a"], truncate_prompt_tokens=0), GRPC_AUTH, INVALID, "truncate_prompt_tokens"),
    ("Embed", pb.EmbedRequest(model="nope", input=["a"]), GRPC_AUTH, grpc.StatusCode.NOT_FOUND, "nope"),
    ("Embed", pb.EmbedRequest(input=["a"]), (), grpc.StatusCode.UNAUTHENTICATED, "API key"),
    ("Classify", pb.ClassifyRequest(input=["a"]), GRPC_AUTH, INVALID, "classification head"),
    ("Score", pb.ScoreRequest(text_1=["a", "b"], text_2=["c"]), GRPC_AUTH, INVALID, "text_2"),
    ("Score", pb.ScoreRequest(text_2=["c"]), GRPC_AUTH, INVALID, "text_1"),
]


@pytest.mark.parametrize(("method", "request_", "metadata", "code", "detail"), BAD, ids=[f"{b[0]}-{b[4]}" for b in BAD])
def test_bad_requests_have_the_status_code_and_name_the_field(stub, method, request_, metadata, code, detail):
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(request_, metadata=metadata)
    assert e.value.code() == code
    assert detail in e.value.details(), e.value.details()


def test_grpc_pooling_calls_are_counted(served, stub):
    base, _, _ = served
    before = metric(base, "mixserve:api_requests_total", endpoint="grpc_embed", status="200")
    stub.Embed(pb.EmbedRequest(input=["count me"]), metadata=GRPC_AUTH)
    assert metric(base, "mixserve:api_requests_total", endpoint="grpc_embed", status="200") == before + 1
