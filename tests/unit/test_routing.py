"""Pure routing math: gate, dispatch plan / combine, expert placement, attention-backend selection, KV layout; the
channel transport's wire format; cutting a step into two micro-batches (in-process, no Ray)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.engine.step import SeqChunk
from cluster.errors import ExpertWorkerError, ExpertWorkerLate
from router import wire
from router.client import ExpertClient
from router.dispatch import WorkerMessage, choose_replicas, combine, plan, plan_one_worker
from router.gate import ExpertLoad, Routing, route
from router.latency import Lateness
from router.placement import ExpertPlacement, PlacementError, interleave_nodes
from router.transport import LocalTransport
from workers.expert_worker import cpu_threads
from workers.kv_cache import plan_step, split_plan, split_point


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


def test_plan_one_worker_docstring_example():
    (m,) = plan_one_worker(Routing(torch.tensor([[3, 0], [0, 1]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]])))
    assert (m.worker, m.tokens.tolist(), m.experts.tolist(), m.rows.tolist()) == (0, [0, 1], [0, 0, 1, 3], [0, 1, 1, 0])
    assert m.weights.tolist() == pytest.approx([0.4, 0.7, 0.3, 0.6])


@given(t=st.integers(1, 40), k=st.integers(1, 3), e=st.integers(3, 8), seed=st.integers(0, 2**16))
def test_plan_one_worker_gives_the_general_plans_message(t, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, K] distinct per token
    routing = Routing(ids, torch.rand(t, k, generator=g))
    (fast,) = plan_one_worker(routing)
    (general,) = plan(routing, torch.zeros(e, dtype=torch.int64))
    for name in ("worker", "tokens", "rows", "experts", "weights"):
        assert torch.equal(torch.as_tensor(getattr(fast, name)), torch.as_tensor(getattr(general, name))), name


def test_combine_of_one_message_with_every_token_is_a_copy_of_its_partial():
    partial = torch.randn(3, 4)
    msgs = [WorkerMessage(0, torch.arange(3), torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3))]
    out = combine(msgs, [partial], like=torch.zeros(3, 4, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.equal(out, partial.double())
    same = combine(msgs, [partial], like=torch.zeros(3, 4))  # same dtype and device: still a copy, not the partial
    assert torch.equal(same, partial) and same.data_ptr() != partial.data_ptr()
    half = [WorkerMessage(0, torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), torch.ones(1))]
    assert combine(half, [partial[:1]], like=torch.zeros(3, 4)).tolist() == [[0.0] * 4, partial[0].tolist(), [0.0] * 4]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wire_round_trip_carries_only_the_routed_rows(dtype):
    torch.manual_seed(2)
    x = torch.randn(7, 6).to(dtype)
    r = route(x.float(), torch.randn(8, 6), 2)
    for m in plan(r, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])):
        buf = wire.pack(3, x, m)
        n, a = len(m.tokens), len(m.rows)
        assert (
            buf.dtype.name == "uint8" and buf.nbytes == 4 * wire.HEADER + -(-n * 6 * x.element_size() // 4) * 4 + 12 * a
        )
        got = wire.unpack(buf)
        assert (got.layer, got.echo) == (3, False)
        assert torch.equal(got.x, x[m.tokens]) and got.x.dtype == dtype
        assert torch.equal(got.rows, m.rows) and torch.equal(got.experts, m.experts)
        assert torch.equal(got.weights, m.weights)
        y = torch.randn(n, 6).to(dtype)
        reply = wire.pack_rows(y)
        assert reply.nbytes == n * 6 * x.element_size()  # bf16/fp16: 2 bytes per value
        assert torch.equal(wire.unpack_rows(reply, n, 6, dtype), y)
    empty = WorkerMessage(
        0, torch.zeros(0, dtype=torch.int64), *(torch.zeros(0, dtype=t) for t in (torch.int64,) * 2), torch.zeros(0)
    )
    got = wire.unpack(wire.pack(1, x, empty, echo=True))
    assert got.x.shape == (0, 6) and got.echo


def test_cpu_threads_from_ray_resources():
    assert cpu_threads({"CPU": 2.0}) == 2
    assert cpu_threads({"CPU": 0.5}) == 1
    assert cpu_threads({"CPU_group_0_abc": 3.0, "CPU_group_abc": 3.0}) == 3
    assert cpu_threads({}) == 1


def _step(chunks):
    return plan_step(chunks, block_size=4, window=None)


def test_split_point_cuts_between_chunks_near_the_middle():
    decodes = [SeqChunk(5, 1, (2 * i, 2 * i + 1)) for i in range(6)]
    assert split_point(_step(decodes), 4) == 3
    assert split_point(_step(decodes), 0) is None  # off
    assert split_point(_step(decodes), 7) is None  # too small
    assert split_point(_step([SeqChunk(0, 9, (1, 2, 3))]), 2) is None  # one chunk is never cut
    # a 6-token prefill chunk between decodes: the only cuts are at chunk starts (1, 7); 7 of 8 leaves 1 < 8/4
    mixed = [SeqChunk(5, 1, (0, 1)), SeqChunk(0, 6, (2, 3)), SeqChunk(7, 1, (4, 5))]
    assert split_point(_step(mixed), 2) is None
    assert split_point(_step([*mixed, SeqChunk(3, 1, (6,)), SeqChunk(3, 1, (7,))]), 2) == 7


def test_split_plan_gives_each_half_its_own_layout():
    chunks = [SeqChunk(5, 1, (0, 1)), SeqChunk(0, 3, (2,)), SeqChunk(6, 1, (3, 4)), SeqChunk(2, 1, (5,))]
    whole = _step(chunks)
    a, b = split_plan(whole, 4)
    assert torch.equal(torch.cat([a.positions, b.positions]), whole.positions)
    assert torch.equal(torch.cat([a.write_block, b.write_block]), whole.write_block)
    assert [g.rows.tolist() for g in a.groups] == [[[0]], [[1, 2, 3]]]
    assert [g.rows.tolist() for g in b.groups] == [[[0], [1]]]
    assert torch.equal(a.groups[0].tables, whole.groups[0].tables[:1])
    assert torch.equal(b.groups[0].mask, whole.groups[0].mask[1:])
    assert b.groups[0].lengths == whole.groups[0].lengths[1:]
    alone = _step(chunks[2:])  # the same sequences laid out on their own see the same keys
    assert torch.equal(b.positions, alone.positions)
    assert b.groups[0].mask[..., : alone.groups[0].mask.shape[-1]].equal(alone.groups[0].mask)


def test_two_micro_batches_give_the_same_tokens_and_logits_in_process(tmp_path):
    folder = write_tiny_model(tmp_path / "m", TinyModelSpec(hidden=64, intermediate=128, layers=2, experts=4))
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=8, max_num_seqs=4, progress=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [[1, 415, 2936, 9060], [1, 330, 1000, 2000, 77, 8, 9, 10, 11, 12, 13], [1, 5], [1, 7, 9]]
    plain = llm.generate(prompts, params)
    # in-process experts answer at once: this checks the cut, not the overlap
    llm.apply_model(lambda model: setattr(model.experts, "overlap_min_batch", 2))
    split = llm.generate(prompts, params)
    assert llm.frontend_info()["micro_batched_steps"] > 0
    for p, s in zip(plain, split, strict=True):
        assert p.token_ids == s.token_ids
        assert p.logprobs is not None and s.logprobs is not None
        for a, b in zip(p.logprobs, s.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-5 and [t for t, _ in a.top] == [t for t, _ in b.top]


def test_replicas_live_on_distinct_workers_and_missing_lists_what_has_no_live_copy():
    p = ExpertPlacement.contiguous(num_layers=2, num_experts=8, num_workers=4, replicas=2)
    assert p.holders(0, 0) == (0, 1) and p.holders(1, 7) == (3, 0)
    assert p.experts_of(1) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert p.missing({0, 1, 2, 3}) == [] and p.missing({0, 2}) == []  # every expert has a copy on 0 or 2
    assert p.missing({0, 1}) == [(0, 4), (0, 5), (1, 4), (1, 5)]  # experts 4, 5 live on workers 2 and 3 only
    one = ExpertPlacement.contiguous(num_layers=1, num_experts=4, num_workers=2)
    assert one.missing({0}) == [(0, 2), (0, 3)]
    with pytest.raises(PlacementError, match="replicas <= expert workers"):
        ExpertPlacement.contiguous(num_layers=1, num_experts=4, num_workers=2, replicas=3)


def test_interleave_nodes_puts_neighbouring_workers_on_different_nodes():
    assert interleave_nodes(["a", "a", "b", "b"]) == [0, 2, 1, 3]
    assert interleave_nodes(["a", "b", "c"]) == [0, 1, 2]
    assert interleave_nodes(["a", "a", "a", "b"]) == [0, 3, 1, 2]
    assert interleave_nodes(["x", "x"]) == [0, 1]


def test_choose_replicas_docstring_example_and_dead_holders():
    assert choose_replicas([5, 3, 2, 1], [(0, 1)] * 4, {0, 1}) == [0, 1, 1, 0]
    assert choose_replicas([5, 3, 2, 1], [(0, 1), (1, 0), (0, 1), (1, 0)], {1}) == [1, 1, 1, 1]
    assert choose_replicas([5, 0], [(0,), (1,)], {0}) == [0, -1]


@given(
    counts=st.lists(st.integers(0, 50), min_size=2, max_size=8),
    workers=st.integers(2, 4),
    data=st.data(),
)
def test_choose_replicas_picks_a_live_holder_and_balances_full_copies(counts, workers, data):
    E = len(counts)
    placement = ExpertPlacement.contiguous(
        num_layers=1, num_experts=E, num_workers=min(workers, E), replicas=min(workers, E)
    )
    holders = [placement.holders(0, e) for e in range(E)]
    live = set(data.draw(st.sets(st.integers(0, placement.num_workers - 1), min_size=1)))
    chosen = choose_replicas(counts, holders, live)
    assert all(w in live and w in holders[e] for e, w in enumerate(chosen))
    # every worker holds every expert here: greedy heaviest-first keeps the spread within the largest expert
    load = [sum(c for c, w in zip(counts, chosen, strict=True) if w == v) for v in sorted(live)]
    assert max(load) - min(load) <= max(counts)


class _FlakyTransport(LocalTransport):
    """In-process experts where the workers in ``dead`` fail every message as a dead Ray actor would."""

    def __init__(self, shards, dead):
        super().__init__(shards)
        self.dead = set(dead)
        self.sent: list[int] = []

    def start(self, layer, x, messages):
        self.sent += [m.worker for m in messages]
        for m in messages:
            if m.worker in self.dead:
                return _Fails(m.worker)
        return super().start(layer, x, messages)


def _flaky_client(placement, shards, dead) -> ExpertClient:
    return ExpertClient(placement, _FlakyTransport(shards, dead))


def _sent(client: ExpertClient) -> list[int]:
    transport = client.transport
    assert isinstance(transport, _FlakyTransport)
    return transport.sent


class _Fails:
    def __init__(self, worker):
        self.worker = worker

    def wait(self, late_at=None):
        raise ExpertWorkerError(f"expert worker {self.worker} is unavailable", worker=self.worker)


def _moe_setup(replicas):
    torch.manual_seed(5)
    T, D, E, K, W = 12, 8, 4, 2, 2
    experts = [torch.nn.Linear(D, D, bias=False) for _ in range(E)]

    class Shard:
        def run(self, layer, x, rows, ids, weights):
            out = torch.zeros_like(x)
            for row, e, w in zip(rows.tolist(), ids.tolist(), weights.tolist(), strict=True):
                out[row] += w * experts[e](x[row])
            return out

    placement = ExpertPlacement.contiguous(num_layers=1, num_experts=E, num_workers=W, replicas=replicas)
    x = torch.randn(T, D)
    routing = route(x, torch.randn(E, D), K)
    dense = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            dense[t] += routing.weights[t, k] * experts[routing.ids[t, k]](x[t])
    return placement, {w: Shard() for w in range(W)}, x, routing, dense


def test_a_dead_worker_is_failed_over_to_the_other_copy_within_the_step():
    placement, shards, x, routing, dense = _moe_setup(replicas=2)
    with torch.no_grad():
        healthy = _flaky_client(placement, shards, dead=[])
        assert torch.allclose(healthy.forward(0, x, routing), dense, atol=1e-6)
        assert sorted(set(_sent(healthy))) == [0, 1]  # balanced: both copies get rows
        client = _flaky_client(placement, shards, dead=[1])
        assert torch.allclose(client.forward(0, x, routing), dense, atol=1e-6)
        assert client.down == {1} and client.failovers == 1
        _sent(client).clear()
        assert torch.allclose(client.forward(0, x, routing), dense, atol=1e-6)
        assert _sent(client) == [0] and client.failovers == 1  # the down worker gets nothing more
        both = _flaky_client(placement, shards, dead=[0, 1])
        with pytest.raises(ExpertWorkerError, match=r"have no live copy: expert workers \[0, 1\] are down"):
            both.forward(0, x, routing)


def test_two_layers_in_flight_to_a_dead_worker_both_fail_over():
    """Two micro-batches in flight: both were sent to worker 1 before the first reply showed it dead."""
    placement, shards, x, routing, dense = _moe_setup(replicas=2)
    client = _flaky_client(placement, shards, dead=[1])
    with torch.no_grad():
        first, second = client.submit(0, x, routing), client.submit(0, x, routing)
        assert torch.allclose(first.result(), dense, atol=1e-6)
        assert torch.allclose(second.result(), dense, atol=1e-6)
    assert client.down == {1} and client.failovers == 2


def test_without_copies_a_dead_worker_fails_the_step():
    placement, shards, x, routing, _ = _moe_setup(replicas=1)
    client = _flaky_client(placement, shards, dead=[1])
    with pytest.raises(ExpertWorkerError, match="expert worker 1 is unavailable"):
        client.forward(0, x, routing)
    assert client.down == set() and client.failovers == 0


class _FrozenTransport(LocalTransport):
    """In-process experts where the workers in ``frozen`` never answer (alive but stalled): their exchange waits
    until ``late_at`` and raises ExpertWorkerLate, as the object-ref transport does; without ``late_at`` it would
    hang, so the test fails instead."""

    def __init__(self, shards, frozen):
        super().__init__(shards)
        self.frozen = set(frozen)
        self.late_ats: list[float | None] = []

    def start(self, layer, x, messages):
        stalled = [m.worker for m in messages if m.worker in self.frozen]
        if not stalled:
            return super().start(layer, x, messages)
        late_ats = self.late_ats

        class _Stalled:
            def wait(self, late_at=None):
                late_ats.append(late_at)
                if late_at is None:
                    raise AssertionError("a stalled worker was waited for without a bound: it would hang")
                time.sleep(max(0.0, late_at - time.monotonic()))
                raise ExpertWorkerLate("late", worker=stalled[0])

        return _Stalled()


def test_lateness_bound_is_derived_from_measured_exchanges():
    lateness = Lateness(window=64, quantile=0.9, factor=4.0, floor_s=0.01, min_samples=8)
    for _ in range(7):
        lateness.record(0.005)
    assert lateness.bound() is None  # too few measured: only the worker timeout applies
    lateness.record(0.005)
    assert lateness.bound() == pytest.approx(0.02)  # 4 x p90 (5 ms) above the 10 ms floor
    quick = Lateness(window=64, quantile=0.9, factor=4.0, floor_s=0.01, min_samples=8)
    for _ in range(8):
        quick.record(0.0001)
    assert quick.bound() == pytest.approx(0.01)  # the floor


def test_a_late_worker_is_hedged_to_the_other_copy_and_routed_around():
    placement, shards, x, routing, dense = _moe_setup(replicas=2)
    client = ExpertClient(placement, _FrozenTransport(shards, frozen=[]))
    with torch.no_grad():
        for _ in range(40):  # exchanges measured: a bound exists
            assert torch.allclose(client.forward(0, x, routing), dense, atol=1e-6)
        bound = client.lateness.bound()
        assert bound is not None and bound >= 0.05
        transport = client.transport
        assert isinstance(transport, _FrozenTransport)
        transport.frozen = {1}
        assert torch.allclose(client.forward(0, x, routing), dense, atol=1e-6)  # from worker 0's copies
    assert client.hedges == 1 and client.failovers == 1 and client.down == {1}
    assert transport.late_ats and all(t is not None for t in transport.late_ats)


def test_without_copies_a_layer_waits_for_its_worker_without_a_late_bound():
    placement, shards, x, routing, dense = _moe_setup(replicas=1)
    seen: list[float | None] = []

    class Recording(LocalTransport):
        def start(self, layer, x, messages):
            done = super().start(layer, x, messages)

            class Watched:
                def wait(self, late_at=None):
                    seen.append(late_at)
                    return done.wait()

            return Watched()

    client = ExpertClient(placement, Recording(shards))
    for _ in range(40):  # a bound as if measured (without copies the client itself measures none)
        client.lateness.record(0.001)
    assert client.lateness.bound() is not None
    with torch.no_grad():
        for _ in range(40):
            assert torch.allclose(client.forward(0, x, routing), dense, atol=1e-6)
    assert set(seen) == {None} and client.hedges == 0


def test_a_worker_that_answers_again_is_taken_back_without_traffic():
    """The health check calls take_back: an idle frontend routes to a recovered worker again (it would otherwise
    report it routed around until its next request)."""
    placement, shards, x, routing, dense = _moe_setup(replicas=2)

    class Recovering(_FlakyTransport):
        def readmit(self, down):
            return down - self.dead

    client = ExpertClient(placement, Recovering(shards, dead=[1]))
    with torch.no_grad():
        assert torch.allclose(client.forward(0, x, routing), dense, atol=1e-6)
    assert client.down == {1}
    client.take_back()
    assert client.down == {1}  # still failing
    _transport = client.transport
    assert isinstance(_transport, Recovering)
    _transport.dead.clear()
    client.take_back()
    assert client.down == set()
