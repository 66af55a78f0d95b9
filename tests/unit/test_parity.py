"""W = 0 parity with transformers' MixtralForCausalLM on checkpoints transformers itself saves (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.checkpoint.load import LoadRole, load_tensors
from cluster.checkpoint.tiny_model import write_checkpoint
from cluster.config.model import ModelConfig
from cluster.engine.sampling import MAX_CHOICES
from cluster.errors import SamplingParamsError
from tests.helpers import LOGITS_TOL, assert_greedy_follows, hf_greedy, hf_logits, hf_mixtral

# name -> (weights seed, MixtralConfig overrides). Fixed seeds, so a failing case is rebuilt identically on a rerun
# (``hash(name)`` is salted per process and would not be).
CASES = {
    "gqa-top2": (101, dict()),
    "sliding-window": (102, dict(sliding_window=8)),
    "top1": (103, dict(num_experts_per_tok=1)),
    "top3": (104, dict(num_experts_per_tok=3, num_local_experts=6)),
    "sharded": (105, dict(shard_size="300KB")),
    "v4-config": (106, dict(v4_config=True, rope_theta=10000.0)),
    "head-dim-set": (107, dict(head_dim=32, num_attention_heads=4, num_key_value_heads=1)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    seed, overrides = CASES[request.param]
    overrides = dict(overrides)
    if "rope_theta" in overrides:
        overrides["rope_parameters"] = {"rope_theta": overrides.pop("rope_theta"), "rope_type": "default"}
    folder = tmp_path_factory.mktemp(request.param)
    model = hf_mixtral(folder, seed=seed, **overrides)
    llm = LLM(folder, expert_workers=0, dtype="float32", progress=False, attention_backend="sdpa")
    yield request.param, folder, model, llm
    llm.shutdown()


PROMPT = [1, 415, 2936, 9060, 285, 1142, 10575, 754, 272, 17898, 3914, 28723, 330, 1000]


def test_logits_match_transformers(case):
    name, _, model, llm = case
    ids = PROMPT + list(range(2000, 2030))  # longer than the sliding window
    ours = llm.logits(ids)
    ref = hf_logits(model, ids)
    assert ours.shape == ref.shape == (len(ids), 32000)
    assert (ours - ref).abs().max().item() < 1e-4, name


def test_greedy_generation_matches_transformers(case):
    name, _, model, llm = case
    ref = hf_greedy(model, PROMPT, 32)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0))[0]
    assert out.token_ids == ref, name
    assert out.prompt_token_ids == PROMPT
    assert out.finish_reason == ("length" if 2 not in ref else "stop")


def test_mixed_lengths_in_one_call_match_alone(case):
    name, _, _, llm = case
    prompts = [PROMPT[:3], PROMPT, PROMPT[:9] + [77] * 20]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 7, 12)]
    together = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, together, strict=True):
        alone = llm.generate([p], sp)[0]
        assert out.token_ids == alone.token_ids, name
        assert len(out.token_ids) == sp.max_tokens


def test_original_mistral_layout_matches_transformers(tmp_path, fast_bf16):
    """The original layout states no dtype: ``auto`` runs it in bfloat16, as released, where the CPU has bf16 units,
    else in float32; either way it equals transformers run in the same dtype."""
    model = hf_mixtral(tmp_path / "hf", seed=3, sliding_window=6)
    config = ModelConfig.from_dir(tmp_path / "hf")
    tensors = load_tensors(tmp_path / "hf", config, role=LoadRole.everything(config), progress=False)
    write_checkpoint(tmp_path / "mistral", config, tensors, fmt="mistral", shards=2)
    assert (tmp_path / "mistral" / "params.json").is_file()
    assert not (tmp_path / "mistral" / "config.json").exists()
    llm = LLM(tmp_path / "mistral", progress=False)
    dtype = llm.config.load.dtype
    assert dtype == ("bfloat16" if fast_bf16 else "float32")
    reference = model.to(getattr(torch, dtype))
    ids = PROMPT + list(range(500, 520))
    assert (llm.logits(ids) - hf_logits(reference, ids)).abs().max().item() < LOGITS_TOL[dtype]
    out = llm.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0))[0]
    assert_greedy_follows(reference, PROMPT, out.token_ids, margin=2 * LOGITS_TOL[dtype])
    if dtype == "float32":
        assert out.token_ids == hf_greedy(model, PROMPT, 32)


def test_eager_backend_matches_sdpa(tmp_path):
    model = hf_mixtral(tmp_path, seed=5, sliding_window=5)
    eager = LLM(tmp_path, attention_backend="eager", progress=False)
    ids = PROMPT + list(range(100, 110))
    assert (eager.logits(ids) - hf_logits(model, ids)).abs().max().item() < 1e-4


def test_text_prompts_and_chunked_prefill(tmp_path):
    """A prompt longer than the step's token budget is prefilled in chunks and still matches transformers."""
    model = hf_mixtral(tmp_path, seed=7, sliding_window=16)
    llm = LLM(tmp_path, max_num_seqs=4, max_num_batched_tokens=8, progress=False)
    prompt_text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = llm.tokenizer.encode(prompt_text)
    assert len(ids) > 24
    out = llm.generate(prompt_text, SamplingParams(max_tokens=20, temperature=0))[0]
    assert out.prompt_token_ids == ids
    assert out.token_ids == hf_greedy(model, ids, 20)
    assert out.text == llm.tokenizer.decode(out.token_ids)


PAGING = {
    "block-1": dict(block_size=1),
    "block-3-no-prefix-cache": dict(block_size=3, enable_prefix_caching=False),
    "block-16": dict(block_size=16),
    # 4 sequences of up to 36 tokens in 12 blocks of 4 positions (6 with the window): running out of blocks forces
    # preemption and recompute
    "tiny-pool-preempts": dict(block_size=4, num_kv_blocks=12, max_num_batched_tokens=8),
}


@pytest.mark.parametrize("paging", list(PAGING))
@pytest.mark.parametrize("window", [None, 6])
def test_paged_cache_matches_transformers(tmp_path, paging, window):
    """Greedy tokens equal transformers' for every block size, with prefix caching on and off, a sliding window
    shorter than the sequence, chunked prefill, shared prefixes and preemption forced by a tiny pool; logits of a
    prefix-cache hit equal a cold run's."""
    model = hf_mixtral(tmp_path, seed=9, sliding_window=window)
    options = dict(PAGING[paging])
    if paging == "tiny-pool-preempts" and window is not None:
        options["num_kv_blocks"] = 6
    llm = LLM(tmp_path, max_num_seqs=4, progress=False, **options)
    prompts = [PROMPT, PROMPT[:4], PROMPT[:9], PROMPT + [28705, 13]]  # the last one shares PROMPT's blocks
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == hf_greedy(model, p, 20), (paging, window, len(p))
    again = llm.generate([PROMPT + [28705, 13]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert again[0].token_ids == outs[3].token_ids
    stats = llm.frontend_info()
    if paging == "tiny-pool-preempts":
        assert stats["engine"]["num_preemptions"] > 0
    caching = PAGING[paging].get("enable_prefix_caching", True)
    # PROMPT (14 tokens) fills a block of up to 13 positions: the later requests find it in the cache
    assert (stats["engine"]["prefix_cache_hits"] > 0) == (caching and PAGING[paging]["block_size"] <= 13)
    assert stats["engine"]["running"] == 0 and stats["kv_blocks_used"] == 0


@pytest.mark.parametrize("chunk", [512, 5])
def test_prompt_logprobs_equal_transformers(tmp_path, chunk):
    """Each prompt token's log-probability given the tokens before it (and its top alternatives) equals
    log_softmax of transformers' logits, with the prompt prefilled whole or in chunks of 5."""
    import torch

    model = hf_mixtral(tmp_path, seed=12)
    llm = LLM(tmp_path, progress=False, max_num_seqs=2, max_num_batched_tokens=chunk)
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    ref = torch.log_softmax(hf_logits(model, PROMPT).double(), dim=-1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(PROMPT)
    for p, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp is not None and lp.token_id == PROMPT[p]
        assert abs(lp.logprob - ref[p - 1, PROMPT[p]].item()) < 1e-4
        assert [t for t, _ in lp.top] == ref[p - 1].topk(3).indices.tolist()


def test_offline_n_and_best_of(tmp_path):
    """n completions per prompt (choice j seeded with seed + j, prompt-major order); best_of keeps the n whose
    tokens have the highest summed logprob, checked against each candidate run alone."""
    hf_mixtral(tmp_path, seed=13)
    llm = LLM(tmp_path, progress=False, max_num_seqs=8)
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=40)
    alone = [
        llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=40 + j, logprobs=0))[0]
        for j in range(4)
    ]
    outs = llm.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=6, temperature=1.0, seed=40, n=3))
    assert len(outs) == 2 and [o.prompt_token_ids for o in outs] == [PROMPT, PROMPT[:5]]  # one per prompt
    assert [len(o.outputs) for o in outs] == [3, 3] and [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert [c.token_ids for c in outs[0].outputs] == [a.token_ids for a in alone[:3]]
    assert outs[0].token_ids == outs[0].outputs[0].token_ids  # the old fields are the first choice's
    (best,) = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=40, n=2, best_of=4))
    ranked = sorted(alone, key=lambda o: -sum(lp.logprob for lp in o.logprobs or []))
    assert [c.token_ids for c in best.outputs] == [o.token_ids for o in ranked[:2]]
    assert all(c.logprobs is None and c.cumulative_logprob is None for c in best.outputs)  # kept only to rank
    assert sp.n == 1
    with pytest.raises(SamplingParamsError, match=r"n must be an integer in \[1, 128\], got 129") as err:
        SamplingParams(n=MAX_CHOICES + 1)
    assert err.value.param == "n"  # the one limit: HTTP and gRPC refuse 129 too (tests/serving/test_grpc.py)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rms_norm_gives_the_bits_of_transformers_four_ops(dtype):
    """workers.layers.rms_norm uses torch's one rms_norm kernel; on CPU it must give exactly what transformers'
    MixtralRMSNorm computes (float32: x * rsqrt(mean(x^2) + eps), cast back, times the weight)."""
    import torch

    from workers.layers import rms_norm

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    for rows, width in ((1, 512), (7, 4096), (33, 1000)):
        x = (torch.randn(rows, width, generator=g) * 10 * torch.rand(rows, 1, generator=g)).to(dt)
        w = (1 + 0.1 * torch.randn(width, generator=g)).to(dt)
        h = x.to(torch.float32)
        want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)
        assert torch.equal(rms_norm(x, w, 1e-5), want)
