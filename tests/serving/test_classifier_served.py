"""Sequence classifiers served next to the main application (two more applications on the same Serve instance, one
with three labels, one a one-label cross-encoder): /classify and gRPC Classify against transformers'
``MixtralForSequenceClassification`` softmax (labels from id2label), /score and gRPC Score against its sigmoid of the
pair, embeddings of a classifier checkpoint, the 400s of what a classifier cannot do, and a mixed load: 16 streamed
generations and 16 embeddings on the main application with 16 classifications at once, each equal to its solo
result."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
import torch
from ray import serve

from cluster.serve.app import build_app
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from cluster.text.tokenizer import Tokenizer
from tests.helpers import hf_mixtral, wait_until
from tests.serving.helpers import API_KEY, wait_healthy
from tests.serving.references import hf_class_scores, hf_embedding, max_diff

pytestmark = [pytest.mark.ray, pytest.mark.serving]

TOL = 1e-4
LABELS = {0: "negative", 1: "positive", 2: "neutral"}
PROMPTS = [
    [1, 415, 2936, 9060, 285, 1142],
    [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837, 1236, 298],
    [1, 330, 5390, 2245, 0, 0],  # ends in pad tokens: the classifier pools the "2245"
]
APPS = ("clf3", "clf1")  # three labels; one label (a cross-encoder)


@pytest.fixture(scope="module")
def classifiers(serve_instance, tmp_path_factory):
    """{app name: (base URL, transformers model, tokenizer)} and the gRPC channel; both deployed at once."""
    models, targets = {}, []
    for name, seed, labels in (("clf3", 7, {"id2label": LABELS}), ("clf1", 9, {"num_labels": 1})):
        folder = tmp_path_factory.mktemp(name)
        model = hf_mixtral(folder, seed=seed, classifier=True, pad_token_id=0, **labels)
        args = {"model": str(folder), "expert_workers": 0, "served_model_name": name, "max_num_seqs": 8}
        targets.append(serve.RunTarget(build_app(args), name=name, route_prefix=f"/{name}"))
        models[name] = (f"{serve_instance[0]}/{name}", model, Tokenizer.from_dir(folder))
    serve.run_many(targets)
    channel = grpc.insecure_channel(serve_instance[1])
    try:
        for base, _, _ in models.values():
            wait_healthy(f"{base}/health")
        yield models, channel
    finally:
        channel.close()
        for name in APPS:  # both at once: each takes its replicas' graceful shutdown
            serve.delete(name, _blocking=False)
        wait_until(lambda: not set(APPS) & set(serve.status().applications), "classifier apps not deleted", 120, 0.5)


def call(classifiers, app: str, method: str, request):
    """A gRPC call to application ``app`` (more than one application runs: the metadata names it)."""
    _, channel = classifiers
    return getattr(pb_grpc.GenerationStub(channel), method)(request, metadata=(("application", app),))


def test_classify_matches_transformers_softmax_and_labels(classifiers):
    base, model, tok = classifiers[0]["clf3"]
    inputs = [*PROMPTS, "a text input"]
    ids = [*PROMPTS, tok.encode("a text input")]
    r = httpx.post(f"{base}/classify", json={"model": "clf3", "input": [*PROMPTS]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "clf3" and body["id"].startswith("classify-")
    assert body["usage"] == {"prompt_tokens": sum(map(len, PROMPTS)), "total_tokens": sum(map(len, PROMPTS))}
    text = httpx.post(f"{base}/classify", json={"input": inputs[-1]}, timeout=60).json()["data"]
    grpc_reply = call(
        classifiers, "clf3", "Classify", pb.ClassifyRequest(input_token_ids=[pb.TokenIds(ids=p) for p in PROMPTS])
    )
    for i, (p, d, g) in enumerate(zip(ids, body["data"] + text, [*grpc_reply.data, None], strict=True)):
        want = hf_class_scores(model, p)
        assert d["index"] == (i if i < len(PROMPTS) else 0) and d["num_classes"] == 3
        assert max_diff(d["probs"], want) < TOL
        assert d["label"] == LABELS[int(want.argmax())]
        if g is not None:
            assert max_diff(list(g.probs), want) < TOL and g.label == d["label"] and g.num_classes == 3
    raw = httpx.post(f"{base}/classify", json={"input": PROMPTS[0], "activation": False}, timeout=60).json()["data"]
    with torch.no_grad():
        assert max_diff(raw[0]["probs"], model(torch.tensor([PROMPTS[0]])).logits[0]) < TOL


def test_score_with_a_one_label_classifier_is_the_sigmoid_of_the_pair(classifiers):
    base, model, tok = classifiers[0]["clf1"]
    query, docs = "What is the capital of France?", ["Paris is.", "Bananas"]
    r = httpx.post(f"{base}/score", json={"text_1": query, "text_2": docs}, timeout=60)
    assert r.status_code == 200, r.text
    g = call(classifiers, "clf1", "Score", pb.ScoreRequest(text_1=[query], text_2=docs))
    for d, s, doc in zip(r.json()["data"], g.data, docs, strict=True):
        want = torch.sigmoid(model(torch.tensor([tok.encode(query) + tok.encode(doc)])).logits[0, 0]).item()
        assert d["score"] == pytest.approx(want, abs=TOL) and s.score == pytest.approx(want, abs=TOL)
    one = httpx.post(f"{base}/classify", json={"input": PROMPTS[1]}, timeout=60).json()["data"][0]
    assert one["label"] == "LABEL_0" and one["num_classes"] == 1
    assert one["probs"][0] == pytest.approx(hf_class_scores(model, PROMPTS[1]).item(), abs=TOL)


def test_embeddings_of_a_classifier_checkpoint(classifiers):
    base, model, _ = classifiers[0]["clf3"]
    r = httpx.post(f"{base}/v1/embeddings", json={"input": PROMPTS[:2], "pooling": "mean"}, timeout=60)
    g = call(classifiers, "clf3", "Embed", pb.EmbedRequest(input_token_ids=[pb.TokenIds(ids=PROMPTS[0])]))
    for d, p in zip(r.json()["data"], PROMPTS, strict=False):
        assert max_diff(d["embedding"], hf_embedding(model, p, "mean")) < TOL
    assert max_diff(list(g.data[0].embedding), hf_embedding(model, PROMPTS[0])) < TOL


def test_what_a_classifier_cannot_do_is_a_400_naming_model(classifiers):
    base, _, _ = classifiers[0]["clf3"]
    for path, body in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/score", {"text_1": "q", "text_2": "d"}),  # three labels: no score
    ):
        r = httpx.post(f"{base}{path}", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", (path, r.text)
    for method, request in (
        ("Score", pb.ScoreRequest(text_1=["q"], text_2=["d"])),
        ("Generate", pb.GenerateRequest(prompt="hi", max_tokens=2)),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call(classifiers, "clf3", method, request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "classif" in e.value.details()


async def _stream_ids(client: httpx.AsyncClient, base: str, prompt: list[int]) -> list[int]:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
    headers = {"authorization": f"Bearer {API_KEY}"}
    ids: list[int] = []
    async with client.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line.removeprefix("data: "))["choices"][0]["logprobs"] or {"tokens": []}
                ids += [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    return ids


async def _vector(client: httpx.AsyncClient, url: str, body: dict, key: str) -> list[float]:
    r = await client.post(url, json=body, headers={"authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["data"][0][key]


def test_mixed_load_equals_solo_results(served, classifiers):
    """16 streamed generations, 16 embeddings (the main application) and 16 classifications (clf3) at once."""
    main, clf = served[0], classifiers[0]["clf3"][0]
    prompts = [[1, 300 + 7 * i, 1000 + 13 * i, 2000 + i, 77] for i in range(16)]
    jobs = [lambda c, p=p: _stream_ids(c, main, p) for p in prompts]
    jobs += [lambda c, p=p: _vector(c, f"{main}/v1/embeddings", {"input": p[1:]}, "embedding") for p in prompts]
    jobs += [lambda c, p=p: _vector(c, f"{clf}/classify", {"input": p}, "probs") for p in prompts]

    async def run(together: bool) -> list:
        async with httpx.AsyncClient(timeout=120) as client:
            if together:
                return await asyncio.gather(*(job(client) for job in jobs))
            return [await job(client) for job in jobs]

    solo, mixed = asyncio.run(run(False)), asyncio.run(run(True))
    for k, (a, b) in enumerate(zip(solo, mixed, strict=True)):
        if k < 16:
            assert a == b and len(a) == 8, k
        else:
            assert max_diff(b, torch.tensor(a)) < 1e-5, k
