"""Quantize-on-load (``quantization="int8" | "int4" | "fp8"``): the numbers each scheme makes, the bytes the experts
then take against bfloat16, int8 greedy decoding equal to the dense model's, a quantized checkpoint refusing
another kind, and ``quantize_attention`` (attention's projections quantized too) against an exact dequantization."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, SamplingParams
from cluster.checkpoint.quant.quantize import quantize
from cluster.config.model import ModelConfig
from cluster.errors import ConfigError, SetupError
from tests import quant_checkpoints as qc
from tests.helpers import LOGITS_TOL, assert_greedy_follows, hf_logits, hf_mixtral
from workers.expert import ExpertShard
from workers.quant import cpu_kernel


def test_the_schemes_numbers():
    w = torch.tensor([[0.5, -1.0]])
    int8 = quantize(w, "int8")
    assert int8.q.tolist() == [[192, 1]] and int8.scale.item() == pytest.approx(1 / 127) and int8.zero.item() == 128
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    int8, int4, fp8 = (quantize(w, k) for k in ("int8", "int4", "fp8"))
    assert int4.group_size == 128 and int4.q.shape == (16, 128) and int4.scale.shape == (16, 2)
    assert ((w - int8.dequantize()).abs() <= int8.scale / 2 + 1e-6).all()
    assert ((w - int4.dequantize()).abs() <= int4.scale.repeat_interleave(128, 1) / 2 + 1e-6).all()
    assert ((w - fp8.dequantize()).abs() <= w.abs() / 16 + fp8.scale * 2**-9).all()  # 3 mantissa bits
    assert quantize(torch.zeros(2, 64), "int4").dequantize().abs().max() == 0  # zero rows stay zero
    assert quantize(torch.randn(4, 96), "int4").group_size == 32  # the largest of 128 / 64 / 32 dividing K


@pytest.mark.parametrize(("kind", "limit"), [("int4", 0.30), ("int8", 0.55), ("fp8", 0.55)])
def test_expert_bytes_against_bfloat16(tmp_path, kind, limit):
    """Mixtral's shape in small (F = 3.5 D): int4 <= 0.30x and int8 / fp8 <= 0.55x the bfloat16 bytes, scales
    included, held in bfloat16."""
    hf_mixtral(tmp_path, seed=2, hidden_size=256, intermediate_size=896, num_hidden_layers=1, vocab_size=1000)
    config = ModelConfig.from_dir(tmp_path)
    pairs = [(0, e) for e in range(config.num_experts)]
    shard = ExpertShard.load(tmp_path, config, pairs, dtype="bfloat16", quantization=kind, progress=False)
    bf16 = len(pairs) * config.expert_param_count() * 2
    assert shard.nbytes() <= limit * bf16, shard.nbytes() / bf16


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A random model whose lm_head is scaled 8x: its next-token logits are as decided as a trained model's
    (median top-2 margin ~0.2 instead of ~0.02), so greedy decoding says something about the experts' error."""
    folder = tmp_path_factory.mktemp("peaked")
    model = hf_mixtral(folder, seed=5)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 8
    save_file(tensors, folder / "model.safetensors")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return folder, model


PROMPTS = [
    [1] + torch.randint(100, 31000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (3, 5, 8, 11, 13, 17, 19, 23)
]


def test_int8_greedy_tokens_equal_the_dense_models(peaked):
    """8 prompts x 32 tokens: int8 experts decode exactly the dense model's tokens (measured here: every one; the
    largest teacher-forced logit error is ~0.012, where the dense logits span ~10)."""
    folder, model = peaked
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    with LLM(folder, expert_workers=0, dtype="float32", progress=False) as dense:
        want = [o.token_ids for o in dense.generate(PROMPTS, params)]
    with LLM(folder, expert_workers=0, dtype="float32", progress=False, quantization="int8") as int8:
        held = int8.apply_model(lambda model: model.experts.transport.shards[0].describe())
        fused = cpu_kernel.kernel()  # float32 activations: the fused CPU kernel, or dequantize + matmul without it
        assert held == "int8: " + (
            "dequantize + matmul (float32 activations)"
            if fused is None
            else f"{fused.name} (<= 32 rows), dequantize + matmul above"
        )
        got = [o.token_ids for o in int8.generate(PROMPTS, params)]
        errors = [(int8.logits(p + t) - dense_logits).abs().max().item() for p, t, dense_logits in _dense(model, want)]
    assert got == want
    assert max(errors) < 0.05
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert_greedy_follows(model, prompt, tokens, margin=0.05)


def _dense(model, outputs):
    for prompt, tokens in zip(PROMPTS, outputs, strict=True):
        yield prompt, tokens, hf_logits(model, prompt + tokens)


def test_a_quantized_checkpoint_refuses_another_kind(tmp_path):
    hf_mixtral(tmp_path, seed=1)
    qc.write_compressed(tmp_path, "w4a16")
    with pytest.raises(ConfigError, match="quantization='int8' conflicts with the checkpoint's own compressed-tensors"):
        LLM(tmp_path, expert_workers=0, dtype="float32", progress=False, quantization="int8")
    with LLM(tmp_path, expert_workers=0, dtype="float32", progress=False, quantization="int4") as llm:  # its own kind
        assert llm.logits([1, 2, 3]).shape == (3, 32000)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantize_attention_runs_the_quantized_numbers(tmp_path, kind, dtype):
    """``quantize_attention=True``: the frontend holds q, k, v (as one matrix) and o in ``kind``, and the logits are
    those of a float32 transformers model of the same weights quantized and dequantized exactly (experts and
    attention; router gates, embeddings and lm_head dense), within the dtype's tolerance; greedy tokens follow it
    where its top-2 margin is clear. (In bfloat16 the reference stays float32: transformers' own bfloat16 run of it
    is itself 0.09 away for int8, where ours is 0.005.)"""
    folder = tmp_path / "dense"
    hf_mixtral(folder, seed=31, sliding_window=8)
    stored = load_file(folder / "model.safetensors")
    exact = {n: quantize(t, kind).dequantize() if qc.QUANTIZED.search(n) else t for n, t in stored.items()}
    reference = qc.dense_reference(folder, exact, tmp_path / "reference")
    options = dict(expert_workers=0, dtype=dtype, progress=False, attention_backend="sdpa", quantization=kind)
    with LLM(folder, **options, quantize_attention=True) as llm:
        forms = llm.frontend_info()["attention_weights"]
        parts = llm.apply_model(lambda model: [len(p.parts) for p in model.projections().values()])
        ids = PROMPTS[3] + list(range(2000, 2012))  # longer than the sliding window
        error = (llm.logits(ids) - hf_logits(reference, ids)).abs().max().item()
        out = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    label = kind  # hidden 64: int4 in groups of 64, one per row, so no "g64" in its name
    assert len(forms) == 1 and forms[0].startswith(label + ": "), forms
    assert parts == [1, 1, 1, 1]  # per layer: qkv as one matrix, o
    assert error < LOGITS_TOL[dtype], error
    assert_greedy_follows(reference, PROMPTS[3], out.token_ids, margin=2 * LOGITS_TOL[dtype])


def test_attention_stays_dense_without_quantize_attention(peaked):
    folder, _ = peaked
    with LLM(folder, expert_workers=0, dtype="float32", progress=False, quantization="int4") as llm:
        assert llm.frontend_info()["attention_weights"] == ["float32"]


def test_quantize_attention_needs_a_kind(peaked):
    folder, _ = peaked
    with pytest.raises(SetupError, match="quantize_attention: Value error, needs quantization"):
        LLM(folder, expert_workers=0, progress=False, quantize_attention=True)


def test_a_quantized_checkpoints_attention_is_served_as_stored(tmp_path):
    """quantize_attention leaves a quantized checkpoint as it is: attention the config leaves dense stays dense."""
    hf_mixtral(tmp_path, seed=1)
    qc.write_compressed(tmp_path, "w4a16", ignore=[*qc.GATE_AND_HEAD, "re:.*self_attn.*"])
    options = dict(expert_workers=0, dtype="float32", progress=False, quantization="int4")
    with LLM(tmp_path, **options, quantize_attention=True) as llm:
        assert llm.frontend_info()["attention_weights"] == ["float32"]
