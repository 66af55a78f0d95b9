"""Pure routing math: gate, dispatch plan / combine, expert placement, attention-backend selection, KV layout."""

from __future__ import annotations

import pytest
import torch

from cluster.placement import ExpertPlacement, PlacementError
from router.dispatch import combine, plan
from router.gate import ExpertLoad, Routing, route


def test_route_matches_the_definition():
    torch.manual_seed(0)
    h, w = torch.randn(5, 16), torch.randn(8, 16)
    r = route(h, w, 2)
    probs = torch.softmax((h @ w.T).float(), dim=-1)
    top, ids = probs.topk(2, dim=-1)
    assert torch.equal(r.ids, ids)
    assert torch.allclose(r.weights, top / top.sum(-1, keepdim=True))
    assert r.weights.dtype == torch.float32
    assert torch.allclose(r.weights.sum(-1), torch.ones(5))


def test_plan_docstring_example():
    ids = torch.tensor([[0, 2], [1, 0], [3, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    msgs = plan(Routing(ids, weights), torch.tensor([0, 0, 1, 1]))
    assert [m.worker for m in msgs] == [0, 1]
    w0, w1 = msgs
    assert w0.tokens.tolist() == [0, 1]
    assert list(zip(w0.rows.tolist(), w0.experts.tolist(), strict=True)) == [(0, 0), (1, 0), (1, 1)]
    assert w0.weights.tolist() == pytest.approx([0.6, 0.3, 0.7])
    assert w1.tokens.tolist() == [0, 2]
    assert list(zip(w1.rows.tolist(), w1.experts.tolist(), strict=True)) == [(0, 2), (1, 2), (1, 3)]


def test_workers_without_rows_get_no_message():
    msgs = plan(Routing(torch.tensor([[0], [1]]), torch.ones(2, 1)), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert [m.worker for m in msgs] == [0]


def test_plan_and_combine_equal_the_dense_sum():
    torch.manual_seed(1)
    T, D, E, K = 7, 6, 8, 2
    x = torch.randn(T, D)
    experts = [torch.nn.Linear(D, D, bias=False) for _ in range(E)]
    r = route(x, torch.randn(E, D), K)
    dense = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            dense[t] += r.weights[t, k] * experts[r.ids[t, k]](x[t])
    msgs = plan(r, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]))
    partials = []
    for m in msgs:
        out = torch.zeros(len(m.tokens), D)
        for row, e, w in zip(m.rows.tolist(), m.experts.tolist(), m.weights.tolist(), strict=True):
            out[row] += w * experts[e](x[m.tokens[row]])
        partials.append(out)
    assert torch.allclose(combine(msgs, partials, like=x), dense, atol=1e-6)


def test_expert_load_counts():
    load = ExpertLoad(2, 4)
    load.add(1, torch.tensor([[0, 3], [3, 2]]))
    assert load.snapshot() == [[0, 0, 0, 0], [1, 0, 1, 2]]


def test_contiguous_placement_when_workers_do_not_divide_experts():
    p = ExpertPlacement.contiguous(num_layers=2, num_experts=8, num_workers=3)
    assert p.mapping[0] == (0, 0, 0, 1, 1, 1, 2, 2)
    assert p.experts_of(2) == [(0, 6), (0, 7), (1, 6), (1, 7)]
    assert ExpertPlacement.contiguous(num_layers=1, num_experts=8, num_workers=8).mapping[0] == tuple(range(8))


@pytest.mark.parametrize(
    ("mapping", "workers", "needle"),
    [
        ([[0, 1, 0, 1]], 2, "layers"),
        ([[0, 1, 0], [0, 1, 0]], 2, "places 3 experts"),
        ([[0, 1, 0, 2], [0, 1, 0, 1]], 2, "worker 2"),
        ([[0, 0, 0, 0], [0, 0, 0, 0]], 2, "holds no expert"),
        ([[0, -1, 0, 1], [0, 1, 0, 1]], 2, "worker -1"),
    ],
)
def test_explicit_placement_is_validated(mapping, workers, needle):
    with pytest.raises(PlacementError, match=needle):
        ExpertPlacement.from_map(mapping, num_layers=2, num_experts=4, num_workers=workers)


def test_too_many_workers():
    with pytest.raises(PlacementError, match="at most one per expert"):
        ExpertPlacement.contiguous(num_layers=1, num_experts=4, num_workers=5)
