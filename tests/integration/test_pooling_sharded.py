"""Pooling and routed experts with the experts on Ray workers (W = 2), against transformers: a classifier's
probabilities, embeddings per pooling mode, and each token's routed experts, with steps cut into two micro-batches
in flight and a prefix found in the prefix cache; over object refs and over channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster import LLM, SamplingParams
from cluster.engine.pooling import PoolingParams
from tests.helpers import hf_mixtral, hf_routed

pytestmark = pytest.mark.ray

PROMPTS = [
    [1, 415, 2936, 9060, 285, 1142],
    [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837, 1236, 298] * 3,
    [1, 330, 5390, 2245, 0, 0],
]
TOL = 1e-4


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier_w2")
    return folder, hf_mixtral(folder, seed=21, classifier=True, id2label={0: "no", 1: "yes"}, pad_token_id=0)


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal_w2")
    return folder, hf_mixtral(folder, seed=22, num_hidden_layers=3)


@pytest.mark.parametrize("transport", ["object_ref", "channel"])
def test_classify_with_two_workers(ray_instance, classifier, transport):
    folder, model = classifier
    with LLM(folder, expert_workers=2, transport=transport, dtype="float32", progress=False) as llm:
        outs = llm.classify(PROMPTS, use_tqdm=False)
    for ids, out in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            want = torch.softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert (torch.tensor(out.outputs.probs) - want).abs().max().item() < TOL
        assert out.outputs.label == ("yes" if want[1] > want[0] else "no")


def test_embed_and_routed_experts_with_two_workers_in_two_micro_batches(ray_instance, causal):
    """overlap_min_batch=8: steps of 8 or more tokens run as two halves in flight, each recording its own rows of
    routed experts; the prompt of 36 tokens runs in chunks of 16 and, the second time, from the prefix cache."""
    folder, model = causal
    params = SamplingParams(max_tokens=6, temperature=0.0, return_routed_experts=True)
    with LLM(
        folder, expert_workers=2, dtype="float32", progress=False, overlap_min_batch=8, max_num_batched_tokens=16
    ) as llm:
        outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        (cached,) = llm.generate([PROMPTS[1]], params, use_tqdm=False)
        embeds = {
            p: llm.embed(PROMPTS, pooling_params=PoolingParams(pooling=p), use_tqdm=False) for p in ("last", "mean")
        }
        info = llm.frontend_info()
    assert info["micro_batched_steps"] > 0 and info["engine"]["prefix_cache_hits"] >= 32
    for prompt, out in zip(PROMPTS[:2], outs, strict=True):
        ids = prompt + out.outputs[0].token_ids
        np.testing.assert_array_equal(out.outputs[0].routed_experts, hf_routed(model, ids[:-1]))
    np.testing.assert_array_equal(cached.outputs[0].routed_experts, outs[1].outputs[0].routed_experts)
    for pooling, results in embeds.items():
        for ids, out in zip(PROMPTS, results, strict=True):
            with torch.no_grad():
                h = model.model(torch.tensor([ids])).last_hidden_state[0].float()
            want = F.normalize(h[-1] if pooling == "last" else h.mean(0), dim=0)
            assert (torch.tensor(out.outputs.embedding) - want).abs().max().item() < TOL, pooling
