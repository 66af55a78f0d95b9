"""An expert shard runs one message through all of its experts (grouped matmuls, or a loop where torch has none)
and returns exactly the weighted SwiGLU sum written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import workers.expert as expert
from workers.expert import ExpertShard


def reference(x, rows, experts, weights, w):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for r, e, g in zip(rows.tolist(), experts.tolist(), weights.tolist(), strict=True):
        w1, w2, w3 = (t.double() for t in w[e])
        xr = x[r].double()
        out[r] += g * (w2 @ (F.silu(w1 @ xr) * (w3 @ xr)))
    return out


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_equals_the_weighted_swiglu_sum(monkeypatch, grouped, dtype):
    if not grouped:
        monkeypatch.setattr(expert, "GROUPED_MM", None)
    g = torch.Generator().manual_seed(0)
    D, Fi, held = 16, 24, [1, 4, 6]  # the shard holds experts 1, 4 and 6 of layer 3
    w = {e: tuple((torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((Fi, D), (D, Fi), (Fi, D))) for e in held}
    shard = ExpertShard({(3, e): w[e] for e in held})
    assert shard.experts == [(3, 1), (3, 4), (3, 6)]
    x = torch.randn(5, D, generator=g).to(dtype)
    # assignments grouped by expert (ascending), expert 4 gets none; token 2 goes to two experts
    rows = torch.tensor([0, 2, 1, 2, 4])
    experts = torch.tensor([1, 1, 6, 6, 6])
    weights = torch.tensor([0.7, 0.4, 0.3, 0.6, 1.0])
    got = shard.run(3, x, rows, experts, weights)
    want = reference(x, rows, experts, weights, w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    assert got.dtype == dtype and got[3].abs().max() == 0  # token 3 was routed to none of these experts


@pytest.mark.parametrize("grouped", [True, False])
def test_a_complete_layer_takes_the_router_ids_as_positions(monkeypatch, grouped):
    """With every expert of a layer (0..E-1) the ids are the stack positions (no checks); the result is the
    reference sum, and a layer short of any expert keeps its checks."""
    if not grouped:
        monkeypatch.setattr(expert, "GROUPED_MM", None)
    g = torch.Generator().manual_seed(1)
    D, Fi, E = 16, 24, 4
    w = {e: tuple(torch.randn(*s, generator=g) * 0.3 for s in ((Fi, D), (D, Fi), (Fi, D))) for e in range(E)}
    shard = ExpertShard({(0, e): w[e] for e in range(E)} | {(1, e): w[e] for e in range(E - 1)}, num_experts=E)
    assert [shard._layers[0].complete, shard._layers[1].complete] == [True, False]
    x = torch.randn(3, D, generator=g)
    rows, experts, weights = torch.tensor([0, 2, 1, 0, 2]), torch.tensor([0, 0, 2, 3, 3]), torch.rand(5, generator=g)
    got = shard.run(0, x, rows, experts, weights).double()
    torch.testing.assert_close(got, reference(x, rows, experts, weights, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="not all held"):
        shard.run(1, x, rows, experts, weights)  # layer 1 lacks expert 3


def test_an_expert_the_shard_does_not_hold_is_an_error():
    w = tuple(torch.ones(2, 2) for _ in range(3))
    shard = ExpertShard({(0, 1): w})
    with pytest.raises(KeyError, match="not all held"):
        shard.run(0, torch.ones(1, 2), torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]))
    with pytest.raises(KeyError, match="layer 5"):
        shard.run(5, torch.ones(1, 2), torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
