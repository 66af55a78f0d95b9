"""Quantized experts' CUDA kernels (``make gpu-check`` runs tests/gpu on a lent GPU; skipped without one): each
quantized form's product against ``x @ w.T`` of its exact dequantization, as tests/unit/test_quant_kernels.py checks
the CPU paths."""

from __future__ import annotations

import pytest
import torch

from cluster.checkpoint.quant.weights import FloatWeight
from tests.unit.test_quant_kernels import int_weight
from workers.quant.linear import Int4Linear, prepare

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["int4", "int8", "fp8-dynamic", "fp8-static"])
def test_cuda_paths(kind):
    """On a GPU (skipped without one): int4 through tinygemm, int8 through whatever runs, fp8 with activations
    through ``_scaled_mm`` on sm89+ (the input quantized per token, or with the static scale), else weight-only."""
    from cluster.config.quantization import ActivationScheme
    from workers.quant.kernels import fp8_matmul_device
    from workers.quant.linear import Fp8Linear

    cuda = torch.device("cuda")
    if kind.startswith("fp8"):
        dynamic = kind == "fp8-dynamic"
        acts = ActivationScheme("float", 8, dynamic, "token" if dynamic else "tensor")
        data = (torch.randn(256, 512) * 30).to(torch.float8_e4m3fn)
        w = FloatWeight(data, torch.rand(256, 1) * 0.01, None if dynamic else torch.tensor(0.02), acts)
    else:
        w = int_weight(256, 512, bits=4 if kind == "int4" else 8, group=128 if kind == "int4" else 512)
    lin = prepare(w, device=cuda, dtype=torch.bfloat16)
    x = torch.randn(24, 512, generator=torch.Generator().manual_seed(0))
    if isinstance(lin, Fp8Linear):
        assert fp8_matmul_device(cuda)
        s = x.abs().amax(-1, keepdim=True) / 448 if kind == "fp8-dynamic" else torch.tensor(0.02)
        x_seen = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s  # what the fp8 input holds
    else:
        assert kind != "int4" or isinstance(lin, Int4Linear)
        x_seen = x.bfloat16().float()
    want = x_seen.double() @ w.dequantize().double().t()
    got = lin(x.to(cuda, torch.bfloat16)).double().cpu()
    assert (got - want).abs().max().item() <= 3e-2 * want.abs().max().item()
