"""The scheduler and engine core against a fake executor: no checkpoint, no model.

The fake executor plays a model whose greedy next token is a fixed function of the current token, and checks
every batch the way a KV cache would: each slot is fed its positions in order, without gaps or repeats, and a slot
is only used while the scheduler has lent it out.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.engine import EngineConfig, EngineCore, RequestOutput
from cluster.errors import (
    EngineOverloadedError,
    ExpertWorkerError,
    InternalError,
    InvalidRequestError,
    PromptTooLongError,
)
from cluster.sampling import SamplingParams
from cluster.step import StepBatch
from cluster.tokenizer import Tokenizer, default_model_file

VOCAB = 32000
EOS = 2


def next_token(t: int) -> int:
    """The fake model's greedy choice after token t (never BOS/EOS)."""
    return 3 + (t * 7919 + 11) % (VOCAB - 3)


class FakeExecutor:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.filled = [0] * num_slots  # positions written per slot
        self.batches: list[StepBatch] = []
        self.fail_with: Exception | None = None

    def reset_slot(self, slot: int) -> None:
        self.filled[slot] = 0

    def execute(self, batch: StepBatch) -> torch.Tensor:
        self.batches.append(batch)
        if self.fail_with is not None:
            raise self.fail_with
        assert batch.num_tokens == sum(c.n for c in batch.chunks)
        slots = [c.slot for c in batch.chunks]
        assert len(set(slots)) == len(slots), "one chunk per slot and step"
        for c in batch.chunks:
            assert 0 <= c.slot < self.num_slots
            assert c.start in (0, self.filled[c.slot]), f"slot {c.slot} fed position {c.start} after {self.filled}"
            self.filled[c.slot] = c.start + c.n
        logits = torch.full((len(batch.logit_rows), VOCAB), -10.0)
        for r, row in enumerate(batch.logit_rows.tolist()):
            logits[r, next_token(int(batch.token_ids[row]))] = 10.0
        return logits


def engine(**limits) -> tuple[EngineCore, FakeExecutor]:
    config = EngineConfig(**limits)
    ex = FakeExecutor(config.max_num_seqs)
    core = EngineCore(
        ex, Tokenizer(default_model_file()), config, max_model_len=256, vocab_size=VOCAB, eos_token_id=EOS
    )
    return core, ex


def expected(prompt: list[int], n: int) -> list[int]:
    out, t = [], prompt[-1]
    for _ in range(n):
        t = next_token(t)
        out.append(t)
    return out


def drain(core: EngineCore, outs: dict[str, list[RequestOutput]] | None = None, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not core.has_work():
            return
        for o in core.step():
            if outs is not None:
                outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish")


GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


def test_chunked_prefill_budget_and_slot_order():
    """Prompts longer than the token budget are prefilled in chunks; decodes go first; every step fits the budget."""
    core, ex = engine(max_num_seqs=3, max_num_batched_tokens=8)
    prompts = {"a": [1] + list(range(10, 30)), "b": [1, 5, 6], "c": [1] + list(range(40, 52))}
    for rid, p in prompts.items():
        core.add_request(rid, p, GREEDY)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    for rid, p in prompts.items():
        assert outs[rid][-1].token_ids == expected(p, 5), rid
    assert all(b.num_tokens <= 8 for b in ex.batches)
    first = ex.batches[0].chunks
    assert [(c.start, c.n) for c in first] == [(0, 8)]  # a takes the whole budget of the first step
    # once a request decodes, its single token comes before any prefill chunk in the step
    for b in ex.batches:
        kinds = [c.n == 1 and c.start > 0 for c in b.chunks]
        assert kinds == sorted(kinds, reverse=True)
    assert core.free_slots == 3


def test_slots_are_lent_and_returned():
    core, ex = engine(max_num_seqs=2, max_num_batched_tokens=16)
    for i in range(5):
        core.add_request(f"r{i}", [1, 100 + i], GREEDY)
    core.step()
    assert core.num_running == 2 and core.num_waiting == 3 and core.free_slots == 0
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert sorted(outs) == [f"r{i}" for i in range(5)]
    assert core.free_slots == 2
    used = {c.slot for b in ex.batches for c in b.chunks}
    assert used == {0, 1}


def test_abort_frees_the_slot_for_a_waiting_request_in_the_same_step():
    core, ex = engine(max_num_seqs=1, max_num_batched_tokens=16)
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    core.add_request("a", [1, 7], long)
    core.add_request("b", [1, 8], GREEDY)
    core.step()
    core.abort("a")
    core.abort("a")
    got = {o.request_id: o for o in core.step()}
    assert got["a"].finished and got["a"].finish_reason == "abort"
    assert got["b"].new_token_ids == expected([1, 8], 1)
    assert ex.batches[-1].chunks[0].start == 0  # b starts fresh in the slot a gave back
    drain(core)
    assert core.stats()["finished_abort"] == 1 and core.free_slots == 1


def test_overload_counts_only_requests_that_must_wait():
    core, _ = engine(max_num_seqs=2, max_num_batched_tokens=16, max_queued_requests=1)
    core.add_request("a", [1, 5], GREEDY)
    core.add_request("b", [1, 6], GREEDY)  # both will get a slot at the next step: neither is queued
    core.add_request("c", [1, 7], GREEDY)  # must wait: the one queue place
    with pytest.raises(EngineOverloadedError):
        core.add_request("d", [1, 8], GREEDY)
    assert core.stats()["rejected_overload"] == 1
    drain(core)


def test_duplicate_ids_and_bad_prompts_are_refused_at_once():
    core, _ = engine(max_num_seqs=2, max_num_batched_tokens=16)
    core.add_request("x", [1, 5], GREEDY)
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("x", [1, 6], GREEDY)
    assert err.value.param == "request_id"
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("y", [], GREEDY)
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as err:
        core.add_request("y", [1, VOCAB], GREEDY)
    assert err.value.param == "prompt"
    with pytest.raises(PromptTooLongError) as err:
        core.add_request("y", [1] * 200, SamplingParams(max_tokens=57))
    assert err.value.param == "max_tokens"
    assert core.num_waiting == 1
    drain(core)


def test_a_failed_step_fails_its_requests_with_an_internal_error_and_the_engine_goes_on():
    core, ex = engine(max_num_seqs=2, max_num_batched_tokens=16)
    core.add_request("a", [1, 5], GREEDY)
    core.add_request("b", [1, 6], GREEDY)
    ex.fail_with = RuntimeError("boom")
    outs = {o.request_id: o for o in core.step()}
    for rid in "ab":
        out = outs[rid]
        assert out.finished and out.finish_reason == "error"
        assert isinstance(out.error, InternalError) and out.error.request_id == rid
        assert "boom" not in out.error.message  # details go to the log, not to the client
    assert core.free_slots == 2 and not core.has_work()
    ex.fail_with = None
    ex.filled = [0, 0]
    core.add_request("c", [1, 9], GREEDY)
    c: dict[str, list[RequestOutput]] = {}
    drain(core, c)
    assert c["c"][-1].token_ids == expected([1, 9], 5)


def test_a_worker_failure_keeps_its_own_error():
    core, ex = engine(max_num_seqs=2, max_num_batched_tokens=16)
    core.add_request("a", [1, 5], GREEDY)
    ex.fail_with = ExpertWorkerError("expert worker 1 is unavailable")
    (out,) = core.step()
    assert isinstance(out.error, ExpertWorkerError) and out.error.message == "expert worker 1 is unavailable"


def test_eos_and_stop_token_ids_end_a_request():
    core, _ = engine(max_num_seqs=2, max_num_batched_tokens=16)
    prompt = [1, 5]
    want = expected(prompt, 3)
    core.add_request("stop-id", prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[want[1]]))
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    final = outs["stop-id"][-1]
    assert final.finish_reason == "stop" and final.token_ids == want[:2]


def test_random_schedules_give_every_request_its_own_tokens():
    """Random arrivals, aborts and limits: each finished request has exactly the fake model's tokens, every slot
    comes back."""
    rng = random.Random(5)
    for trial in range(20):
        seqs = rng.randint(1, 4)
        core, ex = engine(max_num_seqs=seqs, max_num_batched_tokens=rng.randint(seqs, 24), max_queued_requests=64)
        outs: dict[str, list[RequestOutput]] = {}
        prompts: dict[str, tuple[list[int], int]] = {}
        aborted: set[str] = set()
        for i in range(12):
            rid = f"t{trial}-{i}"
            p = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(0, 30))]
            n = rng.randint(1, 8)
            prompts[rid] = (p, n)
            core.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            if rng.random() < 0.2:
                core.abort(rid)
                aborted.add(rid)
            for _ in range(rng.randint(0, 2)):
                for o in core.step():
                    outs.setdefault(o.request_id, []).append(o)
        drain(core, outs)
        for rid, (p, n) in prompts.items():
            final = outs[rid][-1]
            assert final.finished
            if rid in aborted:
                assert final.finish_reason == "abort"
            else:
                assert final.token_ids == expected(p, n), rid
        assert core.free_slots == seqs
