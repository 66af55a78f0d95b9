"""workers.dense: bfloat16 weights on a CPU without bf16 units run through the fused CPU kernel at up to 32 rows
(float32 products, rounded once), everything else through ``F.linear``; a bfloat16 model on either path gives
transformers' own bfloat16 logits. ``$MIXSERVE_CPU_FAST_BF16`` stands in for the CPU's answer, so both paths run on
every host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster import LLM
from cluster.config.dtype import FAST_BF16_ENV
from tests.helpers import LOGITS_TOL, hf_logits, hf_mixtral
from workers import dense
from workers.quant import cpu_kernel
from workers.quant.kernels import FUSED_MAX_ROWS


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, outputs) of every fused-kernel call in the test."""
    calls: list[tuple[int, int]] = []
    real = cpu_kernel.Kernel.linear

    def spy(self, x, w, scale, *, zero=None):
        calls.append((x.shape[0], w.shape[0]))
        return real(self, x, w, scale, zero=zero)

    monkeypatch.setattr(cpu_kernel.Kernel, "linear", spy)
    return calls


@pytest.mark.parametrize("build", ["auto", "portable"])
def test_bf16_without_bf16_units_runs_on_the_kernel_up_to_32_rows(monkeypatch, kernel_calls, build):
    monkeypatch.setenv(FAST_BF16_ENV, "0")
    monkeypatch.setenv(cpu_kernel.ENV, build)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 333, generator=g).bfloat16()  # column and row tails
    for rows in (1, 5, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1):
        x = torch.randn(rows, 333, generator=g).bfloat16()
        kernel_calls.clear()
        got = dense.linear(x, w)
        want = x.double() @ w.double().t()
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 70)
        if rows <= FUSED_MAX_ROWS:
            assert kernel_calls == [(rows, 70)]
            # float32 sums of exact bf16 products, rounded to bf16 once: within half a bf16 step of the exact value
            assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
        else:
            assert kernel_calls == [] and torch.equal(got, F.linear(x, w))


@pytest.mark.parametrize(
    ("bf16_units", "mode", "x_dtype", "w_dtype"),
    [
        ("1", "auto", torch.bfloat16, torch.bfloat16),  # torch multiplies bf16 in hardware
        ("0", "off", torch.bfloat16, torch.bfloat16),  # the kernel is switched off
        ("0", "auto", torch.float32, torch.float32),  # float32 is torch's
        ("0", "auto", torch.float32, torch.bfloat16),  # mixed dtypes are torch's (and its error)
    ],
)
def test_everything_else_is_f_linear(monkeypatch, kernel_calls, bf16_units, mode, x_dtype, w_dtype):
    monkeypatch.setenv(FAST_BF16_ENV, bf16_units)
    monkeypatch.setenv(cpu_kernel.ENV, mode)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 64, generator=g).to(x_dtype), torch.randn(8, 64, generator=g).to(w_dtype)
    if x_dtype != w_dtype:
        with pytest.raises(RuntimeError):
            dense.linear(x, w)
    else:
        assert torch.equal(dense.linear(x, w), F.linear(x, w))
    assert kernel_calls == []


def test_what_the_kernel_does_not_take_is_left_to_f_linear(monkeypatch, kernel_calls):
    """No inner dimension, a mismatched one, a 1-D weight or inputs autograd tracks: F.linear's result or error."""
    monkeypatch.setenv(FAST_BF16_ENV, "0")
    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    x, w = torch.randn(2, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    assert torch.equal(dense.linear(x[:, :0], w[:, :0]), torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        dense.linear(x, w[:, :8])
    assert torch.equal(dense.linear(x, w[0]), F.linear(x, w[0]))  # a 1-D weight gives [M]
    tracked = w.clone().requires_grad_()
    assert dense.linear(x, tracked).grad_fn is not None
    assert kernel_calls == []
    with torch.no_grad():
        dense.linear(x, tracked)
    assert kernel_calls == [(2, 4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16-model")
    return folder, hf_mixtral(folder, seed=3)


@pytest.mark.parametrize("bf16_units", ["0", "1"])
def test_a_bf16_model_gives_transformers_bf16_logits_on_either_path(monkeypatch, kernel_calls, tiny, bf16_units):
    """In-process experts (W=0): attention, lm_head and the dense experts take the kernel without bf16 units (and
    the shard reports it), torch's matmuls with them; the logits are transformers' in bfloat16 either way."""
    monkeypatch.setenv(FAST_BF16_ENV, bf16_units)
    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    folder, model = tiny
    ids = [1, 415, 2936, 9060, 285, 1142, 28705, 28770]
    with LLM(folder, expert_workers=0, dtype="bfloat16", device="cpu", progress=False) as llm:
        kernel_calls.clear()
        got = llm.logits(ids)
        kernels = llm.apply_model(lambda m: m.experts.transport.shards[0].kernels(2))
    want = hf_logits(model.to(torch.bfloat16), ids)
    assert (got - want).abs().max().item() < LOGITS_TOL["bfloat16"]
    fused = {n for _, n in kernel_calls}
    if bf16_units == "1":
        assert kernel_calls == [] and kernels == {"grouped matmul"}
    else:  # qkv [4 heads + 2 x 2 kv heads of 16], o_proj and w2 [64], w13 [2 x 128], lm_head [32000]
        assert fused == {128, 64, 256, 32000}
        assert kernels == {cpu_kernel.kernel().name}  # type: ignore[union-attr]
