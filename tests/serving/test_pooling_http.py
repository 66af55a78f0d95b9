"""POST /v1/embeddings, /classify and /score on the main application (a causal LM, float32) over real HTTP: the
embeddings through the official ``openai`` client (float, and base64 that the client decodes itself) against
transformers' ``MixtralModel`` hidden states, score as the cosine of two such embeddings, the pooling counter in
/metrics, and every bad input as a 400 naming its field."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from openai import OpenAI

from cluster.text.tokenizer import Tokenizer
from tests.serving.helpers import API_KEY, MODEL_NAME, metric, post
from tests.serving.references import hf_causal, hf_embedding, max_diff

pytestmark = [pytest.mark.ray, pytest.mark.serving]

TOL = 1e-4
TEXTS = ["The capital of France is Paris.", "Mixture of experts", "a"]
IDS = [[1, 415, 2936, 9060, 285, 1142], [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837]]


@pytest.fixture(scope="module")
def client(served):
    base, _, _ = served
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(served):
    """(transformers model, tokenizer) of the main application's checkpoint."""
    _, _, folder = served
    return hf_causal(folder), Tokenizer.from_dir(folder)


@pytest.mark.parametrize("encoding", ["float", "client-decoded base64"])
def test_embeddings_match_transformers_last_hidden_state(client, ref, encoding):
    model, tok = ref
    kw = {"encoding_format": "float"} if encoding == "float" else {}  # the client asks for base64 by default
    r = client.embeddings.create(model=MODEL_NAME, input=TEXTS, **kw)
    assert r.object == "list" and r.model == MODEL_NAME and [d.index for d in r.data] == [0, 1, 2]
    ids = [tok.encode(t) for t in TEXTS]
    for d, p in zip(r.data, ids, strict=True):
        assert d.object == "embedding" and len(d.embedding) == model.config.hidden_size
        assert max_diff(d.embedding, hf_embedding(model, p)) < TOL
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_modes_and_token_id_inputs(client, ref, pooling):
    model, _ = ref
    r = client.embeddings.create(model=MODEL_NAME, input=IDS, encoding_format="float", extra_body={"pooling": pooling})
    for d, p in zip(r.data, IDS, strict=True):
        assert max_diff(d.embedding, hf_embedding(model, p, pooling)) < TOL
    assert r.usage.prompt_tokens == sum(map(len, IDS))


def test_base64_is_little_endian_float32_and_vllm_extras(served, ref):
    """Explicit base64 (the bytes as sent), one list of ids as one input, normalize false, truncate_prompt_tokens."""
    base, _, _ = served
    model, _ = ref
    body = {"input": IDS[1], "encoding_format": "base64", "normalize": False, "truncate_prompt_tokens": 4}
    r = post(base, "/v1/embeddings", body)
    assert r.status_code == 200, r.text
    (d,) = r.json()["data"]
    got = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
    assert max_diff(got, hf_embedding(model, IDS[1][-4:], normalize=False)) < TOL
    assert r.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    same = post(base, "/v1/embeddings", {"input": "x", "dimensions": model.config.hidden_size})
    assert same.status_code == 200, same.text


def test_score_with_a_causal_lm_is_the_cosine_of_embeddings(served, ref):
    base, _, _ = served
    model, tok = ref
    r = post(base, "/score", {"model": MODEL_NAME, "text_1": "query text", "text_2": ["a document", "query text"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    q = hf_embedding(model, tok.encode("query text"))
    doc = hf_embedding(model, tok.encode("a document"))
    assert [d["index"] for d in data] == [0, 1] and all(d["object"] == "score" for d in data)
    assert data[0]["score"] == pytest.approx(torch.dot(q, doc).item(), abs=TOL)
    assert data[1]["score"] == pytest.approx(1.0, abs=TOL)
    # each distinct text ran once
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("query text")) + len(tok.encode("a document"))
    alias = post(base, "/v1/score", {"text_1": ["query text"], "text_2": ["a document"]})  # vLLM serves both paths
    assert alias.json()["data"][0]["score"] == pytest.approx(data[0]["score"], abs=1e-6)


BAD = [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [[1, 2], []]}, "input"),
    ({"input": 5}, "input"),
    ({"input": [1, "a"]}, "input.1"),  # the item at fault
    ({"input": [[99999]]}, "input"),  # not a token id of the model
    ({"input": [1] * 4097}, "input"),  # more than the 4096-token context
    ({"input": ["x"] * 129}, "input"),  # the fan-out limit
    ({"input": "x", "dimensions": 32}, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "pooling": "max"}, "pooling"),
    ({"input": "x", "normalize": "yes"}, "normalize"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": "x", "truncate_prompt_tokens": 5000}, "truncate_prompt_tokens"),
    ({"input": "x", "colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_embedding_requests_are_400_naming_the_field(served, body, param):
    base, _, _ = served
    r = post(base, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_classify_on_a_causal_lm_and_other_bad_requests(served):
    base, _, _ = served
    for path, body, status, param in (
        ("/classify", {"input": "hello"}, 400, "model"),
        ("/classify", {"input": []}, 400, "model"),  # the model is checked first
        ("/score", {"text_1": [], "text_2": "d"}, 400, "text_1"),
        ("/score", {"text_1": ["a", "b"], "text_2": ["c"]}, 400, "text_2"),
        ("/score", {"text_1": "q", "text_2": ["d"] * 129}, 400, "text_2"),
        ("/score", {"text_1": "q"}, 400, "text_2"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model"),
    ):
        r = post(base, path, body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["param"] == param, (path, body, r.json())
    assert post(base, "/v1/embeddings", {"input": "x"}, key=None).status_code == 401


def test_pooling_requests_are_counted(served):
    base, _, _ = served
    before = metric(base, "mixserve:pooling_requests_total")
    ok = metric(base, "mixserve:api_requests_total", endpoint="embeddings", status="200")
    assert post(base, "/v1/embeddings", {"input": ["one", "two"]}).status_code == 200
    assert metric(base, "mixserve:pooling_requests_total") == before + 2
    assert metric(base, "mixserve:api_requests_total", endpoint="embeddings", status="200") == ok + 1
