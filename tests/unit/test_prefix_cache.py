"""Prefix caching on a real model (W = 0, float32, CPU) against transformers' MixtralForCausalLM.

The scheduler's tests use a fake executor that stores token ids only: a reused block holding the right tokens but
keys computed at other positions (rotary embeddings) or after another prefix looks right to it. Here the reused
blocks hold real keys and values, so such a block changes the logits.
"""

from __future__ import annotations

import torch

from cluster import LLM, SamplingParams
from tests.helpers import hf_greedy, hf_logits, hf_mixtral

BLOCK = [1, 415, 2936, 9060]
PROMPT = BLOCK * 2 + [7]  # block 1 repeats block 0's tokens at positions 4..7
N = 8


def test_a_prefix_cache_hit_gives_transformers_tokens_and_logprobs(tmp_path):
    """A prompt whose second block repeats its first, run twice: the second run finds both blocks in the cache
    (cached under different names, as they follow different prefixes) and its greedy tokens and every token's
    logprob equal transformers' on the whole sequence. A cache that named blocks by their own tokens only would
    hand the second run block 0 twice, keys rotated for positions 0..3 read at positions 4..7."""
    model = hf_mixtral(tmp_path, seed=31)
    ref_tokens = hf_greedy(model, PROMPT, N)
    ref_lp = torch.log_softmax(hf_logits(model, PROMPT + ref_tokens[:-1]).double(), dim=-1)[len(PROMPT) - 1 :]
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0)
    with LLM(tmp_path, block_size=4, dtype="float32", progress=False) as llm:
        (cold,) = llm.generate([PROMPT], params)
        before = llm.frontend_info()["engine"]
        (warm,) = llm.generate([PROMPT], params)
        after = llm.frontend_info()["engine"]
    assert cold.token_ids == ref_tokens and cold.metrics["cached_tokens"] == 0
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 8  # both full blocks of the prompt, in tokens
    assert warm.metrics["cached_tokens"] == 8
    assert warm.token_ids == ref_tokens
    assert warm.logprobs is not None and len(warm.logprobs) == N
    for j, (tok, lp) in enumerate(zip(warm.token_ids, warm.logprobs, strict=True)):
        assert lp.token_id == tok
        assert abs(lp.logprob - ref_lp[j, tok].item()) < 1e-4, j
