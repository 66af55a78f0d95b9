"""Pooling in process (W = 0) against transformers: ``LLM.classify`` against ``MixtralForSequenceClassification``
(softmax, sigmoid for one label, the last non-pad token, labels from id2label), ``LLM.embed`` against
``MixtralModel``'s last hidden state for each pooling mode, ``LLM.score``, pooling requests batched in the same steps
as generations, and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster import LLM, PoolingParams, SamplingParams
from cluster.errors import InvalidRequestError, PromptTooLongError
from tests.helpers import hf_greedy, hf_mixtral

LABELS = {0: "negative", 1: "positive", 2: "neutral"}
PROMPTS = [
    [1, 415, 2936, 9060, 285, 1142],
    [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837, 1236, 298],
    [1, 28705, 13, 13, 28705],
    [1, 330, 5390, 2245, 0, 0],  # ends in pad tokens: the classifier pools the "2245"
]
TOL = 1e-4


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    model = hf_mixtral(folder, seed=7, classifier=True, id2label=LABELS, pad_token_id=0)
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=8, max_num_seqs=4)  # prompts run in several chunks
    yield model, llm
    llm.shutdown()


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal_pool")
    model = hf_mixtral(folder, seed=8)
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=8, max_num_seqs=4)
    yield model, llm
    llm.shutdown()


def hf_hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(torch.tensor([ids])).last_hidden_state[0].float()  # [T, D], after the final norm


def test_classify_matches_transformers_softmax_and_labels(classifier):
    model, llm = classifier
    outs = llm.classify([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    assert len(outs) == len(PROMPTS)
    for ids, out in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            want = torch.softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        got = torch.tensor(out.outputs.probs)
        assert out.outputs.num_classes == 3
        assert (got - want).abs().max().item() < TOL
        assert out.outputs.label == LABELS[int(want.argmax())]
        assert out.prompt_token_ids == ids


def test_classify_pools_the_last_token_that_is_not_padding(classifier):
    _, llm = classifier
    padded, plain = llm.classify([PROMPTS[3], PROMPTS[3][:4]], use_tqdm=False)
    assert padded.outputs.probs == pytest.approx(plain.outputs.probs, abs=1e-6)


def test_one_label_head_gives_a_sigmoid_and_scores_pairs(tmp_path):
    model = hf_mixtral(tmp_path, seed=9, classifier=True, num_labels=1, pad_token_id=0)
    with LLM(tmp_path, dtype="float32") as llm:
        (out,) = llm.classify([PROMPTS[0]], use_tqdm=False)
        with torch.no_grad():
            logit = model(torch.tensor([PROMPTS[0]])).logits[0, 0].float()
        assert out.outputs.probs == pytest.approx([torch.sigmoid(logit).item()], abs=TOL)
        scores = llm.score("What is the capital of France?", ["Paris is.", "Bananas"], use_tqdm=False)
        for doc, s in zip(["Paris is.", "Bananas"], scores, strict=True):
            ids = llm.tokenizer.encode("What is the capital of France?") + llm.tokenizer.encode(doc)
            with torch.no_grad():
                want = torch.sigmoid(model(torch.tensor([ids])).logits[0, 0].float()).item()
            assert s.outputs.score == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_embed_matches_transformers_hidden_state(causal, pooling):
    model, llm = causal
    outs = llm.embed(PROMPTS, pooling_params=PoolingParams(pooling=pooling), use_tqdm=False)
    for ids, out in zip(PROMPTS, outs, strict=True):
        h = hf_hidden(model, ids)
        want = {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[pooling]
        got = torch.tensor(out.outputs.embedding)
        assert out.outputs.hidden_size == model.config.hidden_size
        assert (got - F.normalize(want, dim=0)).abs().max().item() < TOL


def test_embed_without_normalizing_and_a_cached_prefix(causal):
    model, llm = causal
    params = PoolingParams(normalize=False)
    prompt = PROMPTS[1] * 3  # 36 tokens: two full blocks of 16
    first, again = (llm.embed([prompt], pooling_params=params, use_tqdm=False)[0] for _ in range(2))
    want = hf_hidden(model, prompt)[-1]
    assert (torch.tensor(first.outputs.embedding) - want).abs().max().item() < TOL
    # the second found the prompt's full blocks in the prefix cache and computed only the rest
    assert llm.frontend_info()["engine"]["prefix_cache_hits"] > 0
    assert again.outputs.embedding == pytest.approx(first.outputs.embedding, abs=1e-6)


def test_score_with_a_causal_model_is_the_cosine_of_embeddings(causal):
    model, llm = causal
    (s,) = llm.score("query text", "a document", use_tqdm=False)
    a = hf_hidden(model, llm.tokenizer.encode("query text"))[-1]
    b = hf_hidden(model, llm.tokenizer.encode("a document"))[-1]
    assert s.outputs.score == pytest.approx(F.cosine_similarity(a, b, dim=0).item(), abs=TOL)


def test_pooling_and_generation_share_steps(causal):
    """Embeddings and greedy generations given to the engine at once: each equals its solo result, and some steps
    held both."""
    model, llm = causal
    core = llm._frontend.runtime.frontend.core
    seen: list[tuple[int, int]] = []
    execute = core.executor.execute

    def spy(batch):
        hidden = 0 if batch.hidden_rows is None else len(batch.hidden_rows)
        seen.append((len(batch.logit_rows), hidden))
        return execute(batch)

    core.executor.execute = spy
    try:
        params = [SamplingParams(max_tokens=6, temperature=0.0), PoolingParams(pooling="mean")] * 2
        outs = core.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], params)
    finally:
        core.executor.execute = execute
    assert any(r and h for r, h in seen), seen
    assert outs[0].token_ids == hf_greedy(model, PROMPTS[0], 6)
    assert outs[2].token_ids == hf_greedy(model, PROMPTS[2], 6)
    for i in (1, 3):
        want = F.normalize(hf_hidden(model, PROMPTS[i]).mean(0), dim=0)
        assert outs[i].pooled is not None and outs[i].token_ids == []
        assert (outs[i].pooled - want).abs().max().item() < TOL
    assert core.stats()["pooling_requests"] >= 2
    assert core.kv_blocks_used == 0  # pooling requests keep no blocks after they finish


def test_errors_name_the_field(classifier, causal):
    _, clf = classifier
    _, gen = causal
    with pytest.raises(InvalidRequestError) as e:
        gen.classify(["hello"], use_tqdm=False)
    assert e.value.param == "model"
    with pytest.raises(InvalidRequestError) as e:
        clf.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert e.value.param == "model"
    with pytest.raises(InvalidRequestError) as e:
        gen.embed([[]], use_tqdm=False)
    assert e.value.param == "input"
    with pytest.raises(PromptTooLongError) as e:
        gen.embed([[1] * 600], use_tqdm=False)
    assert e.value.param == "input"
    with pytest.raises(InvalidRequestError) as e:
        gen.embed([[1, 99999]], use_tqdm=False)
    assert e.value.param == "input"
    with pytest.raises(InvalidRequestError) as e:
        clf.score(["a", "b"], ["c", "d", "e"], use_tqdm=False)
    assert e.value.param == "text_2"
    with pytest.raises(InvalidRequestError) as e:
        clf.score("a", "b", use_tqdm=False)  # three labels: not a cross-encoder
    assert e.value.param == "model"
