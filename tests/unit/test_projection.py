"""``workers.projection.Projection``: q, k and v as one matrix where their forms allow, each part on its own where
they do not, against ``F.linear`` of the exact float32 dequantization of the same parts stacked."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cluster.checkpoint.quant.quantize import quantize
from workers.projection import Projection, matrix_bytes
from workers.quant.linear import QuantLinear

K = 64


def _parts(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, K, generator=g) / 8 for n in (64, 32, 32)]  # q, k, v


def _reference(parts, x: torch.Tensor) -> torch.Tensor:
    dense = [p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts]
    return F.linear(x.double(), torch.cat(dense).double()).float()


X = torch.randn(5, K, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_parts_become_one_matrix(dtype):
    parts = _parts(0)
    p = Projection.build(parts, device="cpu", dtype=dtype)
    (dense,) = p.parts
    assert isinstance(dense, torch.Tensor) and dense.dtype == dtype and p.shape == (128, K)
    assert torch.equal(dense, torch.cat(parts).to(dtype))
    assert p.describe() == [str(dtype).removeprefix("torch.")]
    assert matrix_bytes(p) == p.nbytes() == 128 * K * dtype.itemsize
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (p(X.to(dtype)).float() - _reference(parts, X)).abs().max() < tol


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantized_parts_of_one_scheme_become_one_quantized_matrix(kind):
    parts = [quantize(w, kind) for w in _parts(1)]
    p = Projection.build(parts, device="cpu", dtype=torch.float32)
    (only,) = p.parts
    assert isinstance(only, QuantLinear) and only.shape == (128, K)
    assert p.nbytes() == only.nbytes() < 128 * K * 4 // 2
    assert (p(X) - _reference(parts, X)).abs().max() < 1e-5


def test_parts_that_cannot_be_fused_run_each_on_its_own():
    """A dense v beside quantized q and k; then q, k and v each with its own column order (GPTQ's act order)."""
    q, k, v = _parts(2)
    mixed = [quantize(q, "int4"), quantize(k, "int4"), v]
    p = Projection.build(mixed, device="cpu", dtype=torch.float32)
    assert [type(part) is torch.Tensor for part in p.parts] == [False, False, True] and p.shape == (128, K)
    assert (p(X) - _reference(mixed, X)).abs().max() < 1e-5
    g = torch.Generator().manual_seed(3)
    permuted = [dataclasses.replace(quantize(w, "int4"), perm=torch.randperm(K, generator=g)) for w in (q, k, v)]
    p = Projection.build(permuted, device="cpu", dtype=torch.float32)
    assert len(p.parts) == 3
    assert (p(X) - _reference(permuted, X)).abs().max() < 1e-5


def test_parts_of_different_widths_are_refused():
    with pytest.raises(ValueError, match=r"inputs of one width, not \[32, 64\]"):
        Projection([torch.zeros(4, 64), torch.zeros(4, 32)])


def test_a_placeholder_holds_no_memory():
    p = Projection.placeholder(128, K)
    assert p.shape == (128, K) and p.parts[0].device.type == "meta" and p.numel() == 128 * K


@pytest.mark.parametrize("kind", ["untied", "tied", "classifier"])
def test_the_matrices_a_step_multiplies_by(tmp_path, kind):
    """``MixtralModel.matrices``: the projections and router gates, and lm_head; the embedding only where it is the
    tied lm_head (a classifier only indexes it, and multiplies by its score head)."""
    from cluster import LLM
    from tests.helpers import hf_mixtral

    extra = {"tied": {"tie_word_embeddings": True}, "classifier": {"classifier": True, "num_labels": 3}}
    hf_mixtral(tmp_path, seed=1, pad_token_id=0, **extra.get(kind, {}))
    with LLM(tmp_path, expert_workers=0, dtype="float32", progress=False) as llm:
        names = llm.apply_model(lambda model: sorted(model.matrices()))
    head = {"untied": ["lm_head"], "tied": ["embed_tokens"], "classifier": ["score"]}[kind]
    layers = [f"layers.{i}.{m}" for i in range(2) for m in ("block_sparse_moe.gate", "self_attn.o_proj",
                                                             "self_attn.qkv_proj")]  # fmt: skip
    assert names == sorted(head + layers)
