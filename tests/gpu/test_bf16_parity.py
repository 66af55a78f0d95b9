"""bfloat16 on CUDA: ``cluster.LLM`` (W = 0) against transformers' MixtralForCausalLM in bfloat16 on CUDA.

Every test runs on three engines (``VARIANTS``): the prompt prefilled whole (one step), prefilled in chunks of 8
tokens (each chunk attending to the paged KV cache of the ones before; with several prompts, chunks share steps with
other sequences' decode tokens), and chunked with the eager attention backend instead of the one ``auto`` picks
(sdpa, or flash-attention-2 where it imports). Prefill: full-sequence logits (``LLM.logits``, longer than the
sliding window) against the fp32 reference. Decode: greedy tokens against transformers' bf16 greedy tokens, and
the log-probability of each generated token (first from the prefill's last row, then from one decode step each)
against the fp32 reference's on the same tokens.

Only the public API (``LLM.generate``, ``LLM.logits``) is used. The exact reference is transformers in float32 on
the CPU; bf16 results, ours and transformers' alike, are judged by their distance to it. Subtle numerical slips
(e.g. a wrong RoPE theta on this tiny random model) hide inside bf16 noise: the float32 parity tests in
tests/unit/test_parity.py pin those. This file catches what only the CUDA/bf16 path can get wrong (kernels, masks,
windows, norms, dtype handling).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.helpers import hf_logits, hf_mixtral

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16
# Greedy tokens must be identical for at least this many tokens; later, bf16 rounding may tip a close call.
N_IDENTICAL = 8
PROMPTS = [
    [1, 415, 2936, 9060, 285, 1142, 10575, 754, 272, 17898, 3914, 28723, 330, 1000],
    [1, 330, 1000, 2000, 77, 8, 9, 10, 11, 12, 13],
    [1, 5],
]
LOGIT_IDS = PROMPTS[0] + list(range(2000, 2040))  # longer than the sliding window below


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(folder, transformers fp32 on CPU, transformers bf16 on CUDA) for one random checkpoint."""
    folder = tmp_path_factory.mktemp("bf16")
    fp32 = hf_mixtral(folder, seed=21, num_local_experts=8, sliding_window=24)
    bf16 = copy.deepcopy(fp32).to(device="cuda", dtype=torch.bfloat16)
    return folder, fp32, bf16


# name: the engine's options besides W = 0, bfloat16 and CUDA
VARIANTS = {
    "prefill-whole": {},
    "prefill-chunked-8": {"max_num_batched_tokens": 8, "max_num_seqs": 4},
    "eager-chunked-8": {"attention_backend": "eager", "max_num_batched_tokens": 8, "max_num_seqs": 4},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def llm(request, models):
    folder, _, _ = models
    engine = LLM(folder, expert_workers=0, dtype="bfloat16", device="cuda", progress=False, **VARIANTS[request.param])
    yield engine
    engine.shutdown()


def cuda_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda"), use_cache=False).logits[0].float().cpu()


def cuda_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes: no generation config, EOS or cache logic in the way."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(cuda_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


@dataclass(frozen=True)
class Bf16Tolerance:
    max_err: float  # largest |bf16 logit - fp32 logit| allowed
    mean_err: float  # largest mean |bf16 logit - fp32 logit| allowed
    tie: float  # exact (fp32) margins below this are near-ties that bf16 rounding may tip


@pytest.fixture(scope="module")
def tolerance(models) -> Bf16Tolerance:
    """Tolerances calibrated on transformers' own bf16 error against the fp32 reference, on this checkpoint.

    bfloat16 keeps 8 significant bits (relative rounding 2**-9 per operation). Both implementations round after
    every matmul, norm and softmax, but in different orders and with different kernels (fused vs per-expert MoE
    GEMMs, sdpa vs flash-attention), so their errors are of the same size but not the same values. Measuring
    transformers' error calibrates to this model's logit scale instead of guessing absolute numbers; 4x leaves room
    for another accumulation order. The mean is the sensitive check: a real bug (rotary, norm, routing) moves the
    logits by the order of their spread (std ~0.16 here), two orders of magnitude above bf16's mean error (~1e-3),
    while the max is dominated by a few outliers. A near-tie is 8x the mean error: two tokens closer than that in
    fp32 may swap under any bf16 implementation.
    """
    _, fp32, bf16 = models
    exact = hf_logits(fp32, LOGIT_IDS)
    err = (cuda_logits(bf16, LOGIT_IDS) - exact).abs()
    assert 0 < err.max().item() < 0.5 * exact.abs().max().item(), "transformers' bf16 run is not plausibly bf16"
    return Bf16Tolerance(
        max_err=4 * err.max().item() + 1e-3, mean_err=4 * err.mean().item() + 1e-4, tie=8 * err.mean().item()
    )


def test_logits_close_to_fp32_like_transformers_bf16(models, llm, tolerance):
    _, fp32, bf16 = models
    exact = hf_logits(fp32, LOGIT_IDS)
    ours = llm.logits(LOGIT_IDS).float().cpu()
    assert ours.shape == exact.shape == (len(LOGIT_IDS), 32000)
    err = (ours - exact).abs()
    assert err.max().item() > 0, "identical to fp32: the model did not run in bfloat16"
    assert err.max().item() <= tolerance.max_err
    assert err.mean().item() <= tolerance.mean_err
    # The next-token choice agrees with the fp32 model about as often as transformers' bf16 run does (it may lose
    # one near-tie more), and everywhere the fp32 choice is clear.
    theirs = cuda_logits(bf16, LOGIT_IDS)
    want = exact.argmax(-1)
    assert (ours.argmax(-1) == want).sum().item() >= (theirs.argmax(-1) == want).sum().item() - 1
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * tolerance.tie
    assert clear.sum().item() >= len(LOGIT_IDS) // 4, "too few clear positions: the check would be vacuous"
    assert torch.equal(ours.argmax(-1)[clear], want[clear])


def test_greedy_tokens_match_transformers_bf16(models, llm, tolerance):
    _, fp32, bf16 = models
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = cuda_greedy(bf16, prompt, NEW_TOKENS)
        assert len(out.token_ids) == NEW_TOKENS
        diverged = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref, strict=True)) if a != b), None)
        if diverged is None or diverged >= N_IDENTICAL:
            continue
        # An earlier divergence is only acceptable at a near-tie of the exact (fp32) model on the shared prefix.
        exact = hf_logits(fp32, prompt + ref[:diverged])[-1]
        margin = (exact[out.token_ids[diverged]] - exact[ref[diverged]]).abs().item()
        assert margin <= tolerance.tie, (
            f"prompt {prompt}: tokens differ at {diverged} (ours {out.token_ids[:N_IDENTICAL]}, transformers "
            f"{ref[:N_IDENTICAL]}) and the fp32 margin {margin:.4f} is not a bf16 near-tie (<= {tolerance.tie:.4f})"
        )


def test_decode_logprobs_close_to_fp32(models, llm, tolerance):
    """Each generated token's log-probability (the prefill's last row, then one decode step per token, through the
    KV cache) is within bf16 error of the fp32 reference's for the same context: log_softmax moves by at most twice
    the largest logit error (the logit's own and the log-sum-exp's)."""
    _, fp32, _ = models
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params), strict=True):
        assert out.logprobs is not None and len(out.logprobs) == NEW_TOKENS
        exact = torch.log_softmax(hf_logits(fp32, prompt + out.token_ids).double(), dim=-1)
        for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert lp.token_id == token and lp.logprob == lp.top[0][1]  # greedy: the chosen token is a top one
            want = exact[len(prompt) - 1 + i, token].item()
            assert abs(lp.logprob - want) <= 2 * tolerance.max_err, (prompt, i, lp.logprob, want)
