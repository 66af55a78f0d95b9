"""Routed experts per token in process (W = 0) against transformers' ``output_router_logits`` top-k: the prompt and
every generated token but the last, per layer, with prompts computed in chunks, a prefix found in the prefix cache,
and the engine-wide default."""

from __future__ import annotations

import numpy as np
import pytest

from cluster import LLM, SamplingParams
from tests.helpers import hf_mixtral, hf_routed

PROMPT = [1, 22557, 28725, 586, 1141, 349, 5766, 304, 315, 837, 1236, 298] * 3  # 36 tokens: two full blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routed")
    return folder, hf_mixtral(folder, seed=11, num_hidden_layers=3)


def test_routed_experts_equal_transformers_router_top_k(model_dir):
    folder, model = model_dir
    params = SamplingParams(max_tokens=8, temperature=0.0, return_routed_experts=True)
    with LLM(folder, dtype="float32", max_num_batched_tokens=16) as llm:  # the prompt runs in three chunks
        (first,) = llm.generate([PROMPT], params, use_tqdm=False)
        (again,) = llm.generate([PROMPT], params, use_tqdm=False)  # its first 32 positions come from the cache
        hits = llm.frontend_info()["engine"]["prefix_cache_hits"]
        (plain,) = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    out = first.outputs[0]
    ids = PROMPT + out.token_ids
    want = hf_routed(model, ids[:-1])  # the last token is sampled, never run
    assert out.routed_experts is not None
    assert out.routed_experts.shape == (len(ids) - 1, 3, 2)
    np.testing.assert_array_equal(out.routed_experts, want)
    assert hits >= 32
    np.testing.assert_array_equal(again.outputs[0].routed_experts, want)
    assert plain.outputs[0].routed_experts is None


def test_engine_default_returns_them_for_every_request(model_dir):
    folder, model = model_dir
    with LLM(folder, dtype="float32", enable_return_routed_experts=True) as llm:
        (out,) = llm.generate([PROMPT[:5]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    ids = PROMPT[:5] + out.outputs[0].token_ids
    np.testing.assert_array_equal(out.outputs[0].routed_experts, hf_routed(model, ids[:-1]))
