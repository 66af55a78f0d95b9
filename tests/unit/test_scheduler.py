"""The scheduler and engine core against a fake executor: no checkpoint, no model.

The fake executor plays a paged model: it writes each chunk's token ids into the blocks of the chunk's block table
and predicts the next token as a hash of every token it can read back through that table (all of them, or the
sliding window's). Reading a position of a freed block, or one never written, fails the test, and a wrong, stale or
wrongly shared block changes the predicted tokens. It stores token ids, not keys and values: whether a cached block
holds the right KV for its position is checked against the real model (``test_prefix_cache.py``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.engine import EngineConfig, EngineCore, RequestOutput
from cluster.engine.sampling import SamplingParams, StructuredOutput
from cluster.engine.step import FREED, StepBatch, StepOutput
from cluster.errors import (
    EngineOverloadedError,
    ExpertWorkerError,
    InternalError,
    InvalidRequestError,
    PromptTooLongError,
    SamplingParamsError,
)
from cluster.text.tokenizer import Tokenizer, default_model_file

VOCAB = 32000
EOS = 2


def next_token(context: list[int]) -> int:
    """The fake model's greedy choice: a hash of every token it can see (never BOS/EOS)."""
    h = 0
    for t in context:
        h = (h * 1000003 + t + 1) % (2**61 - 1)
    return 3 + h % (VOCAB - 3)


class FakeExecutor:
    """A paged "model" that reads its context back through the block tables: the token it predicts depends on
    every cached token it can see, so a wrong, stale or shared-and-overwritten block changes the output."""

    def __init__(self, num_blocks: int, block_size: int, window: int | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.store: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.batches: list[StepBatch] = []
        self.fail_with: Exception | None = None

    def _at(self, blocks: tuple[int, ...], pos: int) -> int:
        b = blocks[pos // self.block_size]
        assert b != FREED, f"position {pos} is read after its block was freed"
        t = self.store[b][pos % self.block_size]
        assert t is not None, f"position {pos} is read before it was written"
        return t

    def execute(self, batch: StepBatch) -> StepOutput:
        self.batches.append(batch)
        if self.fail_with is not None:
            raise self.fail_with
        assert batch.num_tokens == sum(c.n for c in batch.chunks)
        row, want = 0, {}
        for c in batch.chunks:
            assert len(c.blocks) * self.block_size >= c.start + c.n
            for p in range(c.start, c.start + c.n):
                self.store[c.blocks[p // self.block_size]][p % self.block_size] = int(batch.token_ids[row])
                lo = 0 if self.window is None else max(0, p - self.window + 1)
                want[row] = (c.blocks, lo, p)
                row += 1
        logits = torch.full((len(batch.logit_rows), VOCAB), -10.0)
        for r, i in enumerate(batch.logit_rows.tolist()):
            blocks, lo, p = want[i]
            logits[r, next_token([self._at(blocks, q) for q in range(lo, p + 1)])] = 10.0
        return StepOutput(logits=logits)


def engine(
    *, num_blocks: int = 64, block_size: int = 4, window: int | None = None, **limits
) -> tuple[EngineCore, FakeExecutor]:
    config = EngineConfig(**limits)
    ex = FakeExecutor(num_blocks, block_size, window)
    core = EngineCore(
        ex,
        Tokenizer(default_model_file()),
        config,
        max_model_len=256,
        vocab_size=VOCAB,
        eos_token_id=EOS,
        sliding_window=window,
    )
    return core, ex


def expected(prompt: list[int], n: int, window: int | None = None) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq if window is None else seq[-window:]))
    return seq[len(prompt) :]


def drain(core: EngineCore, outs: dict[str, list[RequestOutput]] | None = None, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not core.has_work():
            return
        for o in core.step():
            if outs is not None:
                outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish")


GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


def test_chunked_prefill_budget_and_order():
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
    assert [(c.start, c.n) for c in ex.batches[0].chunks] == [(0, 8)]  # a takes the whole first step
    for b in ex.batches:  # once a request decodes, its single token comes before any prefill chunk
        kinds = [c.n == 1 and c.start > 0 for c in b.chunks]
        assert kinds == sorted(kinds, reverse=True)
    assert core.kv_blocks_used == 0


def test_batch_places_and_blocks_are_lent_and_returned():
    core, ex = engine(max_num_seqs=2, max_num_batched_tokens=16, block_size=2)
    for i in range(5):
        core.add_request(f"r{i}", [1, 100 + i, 7], GREEDY)
    core.step()
    assert core.num_running == 2 and core.num_waiting == 3
    assert core.kv_blocks_used == 4  # 3 tokens each in blocks of 2
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert {rid: o[-1].token_ids for rid, o in outs.items()} == {
        f"r{i}": expected([1, 100 + i, 7], 5) for i in range(5)
    }
    assert core.kv_blocks_used == 0


def test_prefix_cache_reuses_full_blocks_and_gives_the_same_tokens():
    shared = [1] + list(range(200, 219))  # 20 tokens: 5 full blocks of 4
    for caching in (True, False):
        core, ex = engine(max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=caching)
        core.add_request("first", shared + [7, 8], GREEDY)
        drain(core)
        n_before = len(ex.batches)
        core.add_request("second", shared + [9], GREEDY)
        outs: dict[str, list[RequestOutput]] = {}
        drain(core, outs)
        assert outs["second"][-1].token_ids == expected(shared + [9], 5)
        first_chunk = ex.batches[n_before].chunks[0]
        assert first_chunk.start == (20 if caching else 0)  # 5 cached blocks: only token 9 is computed
        assert outs["second"][-1].metrics["cached_tokens"] == (20 if caching else 0)
        assert core.stats()["prefix_cache_hits"] == (20 if caching else 0)  # tokens: 5 blocks of 4
        assert core.kv_blocks_used == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    core, ex = engine(max_num_seqs=2, max_num_batched_tokens=64)
    prompt = [1] + list(range(300, 315))  # 16 tokens = 4 full blocks
    core.add_request("a", prompt, GREEDY)
    drain(core)
    core.add_request("b", prompt, GREEDY)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert outs["b"][-1].token_ids == expected(prompt, 5)
    assert [(c.start, c.n) for c in ex.batches[-5].chunks] == [(12, 4)]  # 3 blocks reused, the 4th recomputed


def test_running_out_of_blocks_preempts_the_newest_and_recomputes_it():
    long = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    core, ex = engine(max_num_seqs=3, max_num_batched_tokens=16, num_blocks=14, block_size=4)
    prompts = {rid: [1, 40 + i, 41 + i, 42 + i] for i, rid in enumerate("abc")}
    for rid, p in prompts.items():
        core.add_request(rid, p, long)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert core.stats()["num_preemptions"] > 0
    for rid, p in prompts.items():
        final = outs[rid][-1]
        assert final.token_ids == expected(p, 24) and final.finish_reason == "length"
        assert [t for o in outs[rid] for t in o.new_token_ids] == final.token_ids  # no token twice or lost
    assert core.kv_blocks_used == 0


def test_preemption_takes_the_newest_running_request_not_in_the_step():
    """Blocks of 4, a pool of 5: a and b (4 tokens) and c and d (3 tokens) are admitted in one step (4 blocks; e
    waits for a batch place). At the first decode a takes the last free block; b needs one too, and the requests
    not in the step yet are c and d: d, the newest, is preempted (it goes back in front of e) and b takes its
    block, while c decodes in its own block. Nothing else is preempted and every request still gets its tokens."""
    core, ex = engine(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=5, block_size=4)
    prompts = {"a": [1, 10, 11, 12], "b": [1, 20, 21, 22], "c": [1, 30, 31], "d": [1, 40, 41], "e": [1, 50, 51]}
    for rid, p in prompts.items():
        core.add_request(rid, p, GREEDY)
    sched = core.scheduler
    core.step()
    assert [r.request_id for r in sched.running] == ["a", "b", "c", "d"]
    assert [r.request_id for r in sched.waiting] == ["e"] and sched.pool.num_free == 1
    core.step()
    assert sched.preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["d", "e"]
    assert [r.request_id for r in sched.running] == ["a", "b", "c"]
    assert [(c.start, c.n) for c in ex.batches[-1].chunks] == [(4, 1), (4, 1), (3, 1)]  # a, b, c decode
    d = sched.waiting[0]
    assert d.computed == 0 and d.blocks == [] and len(d.output) == 1  # recomputed from scratch, token kept
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    for rid, p in prompts.items():
        assert outs[rid][-1].token_ids == expected(p, 5), rid
    assert core.kv_blocks_used == 0


def test_the_engine_runs_one_choice_per_request():
    """n > 1 or best_of > 1 is expanded by cluster.engine.fanout before it reaches the engine: the engine refuses
    it at once, naming n and pointing at fanout, and queues nothing."""
    core, _ = engine()
    for params in (
        SamplingParams(n=2),
        SamplingParams(best_of=2),
        SamplingParams(n=3, best_of=5),
        SamplingParams(n=4, best_of=4, seed=1),
    ):
        with pytest.raises(InvalidRequestError) as err:
            core.add_request("x", [1, 5], params)
        assert err.value.param == "n"
        assert "cluster.engine.fanout" in err.value.message
        assert f"n={params.n} / best_of={params.best_of}" in err.value.message
    assert core.num_waiting == 0 and not core.has_work()
    core.add_request("x", [1, 5], GREEDY)  # the id was never taken
    assert core.num_waiting == 1


def test_a_sliding_window_frees_the_blocks_it_leaves():
    core, ex = engine(max_num_seqs=1, max_num_batched_tokens=8, block_size=4, window=6, num_blocks=5)
    prompt = [1] + list(range(500, 520))
    core.add_request("w", prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    outs: dict[str, list[RequestOutput]] = {}
    peak = 0
    while core.has_work():
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
        peak = max(peak, core.kv_blocks_used)
    assert outs["w"][-1].token_ids == expected(prompt, 40, window=6)
    assert peak <= 5 and core.stats()["num_preemptions"] == 0  # 61 positions in 5 blocks of 4
    assert any(FREED in c.blocks for b in ex.batches for c in b.chunks)


def test_abort_frees_blocks_for_a_waiting_request_in_the_same_step():
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
    drain(core)
    assert core.stats()["finished_abort"] == 1 and core.kv_blocks_used == 0


def test_overload_counts_only_requests_that_must_wait():
    core, _ = engine(max_num_seqs=2, max_num_batched_tokens=16, max_queued_requests=1)
    core.add_request("a", [1, 5], GREEDY)
    core.add_request("b", [1, 6], GREEDY)  # both will run at the next step: neither is queued
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
    small, _ = engine(max_num_seqs=2, max_num_batched_tokens=16, num_blocks=4, block_size=4)
    with pytest.raises(PromptTooLongError) as err:  # fits max_model_len, not the whole KV cache
        small.add_request("y", [1] * 10, SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens" and "KV cache holds 16 positions" in err.value.message
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
    assert core.kv_blocks_used == 0 and not core.has_work()
    ex.fail_with = None
    core.add_request("c", [1, 9], GREEDY)
    c: dict[str, list[RequestOutput]] = {}
    drain(core, c)
    assert c["c"][-1].token_ids == expected([1, 9], 5)


def test_a_worker_failure_keeps_its_own_error(caplog):
    """The requests get the worker's error as it is, and the server log says once which requests it ended."""
    core, ex = engine(max_num_seqs=2, max_num_batched_tokens=16)
    core.add_request("a", [1, 5], GREEDY)
    ex.fail_with = ExpertWorkerError("expert worker 1 is unavailable")
    with caplog.at_level(logging.WARNING, logger="mixserve"):
        (out,) = core.step()
    assert isinstance(out.error, ExpertWorkerError) and out.error.message == "expert worker 1 is unavailable"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["step failed for requests ['a']: ExpertWorkerError: expert worker 1 is unavailable"]


def test_stop_token_ids_end_a_request():
    core, _ = engine(max_num_seqs=2, max_num_batched_tokens=16)
    prompt = [1, 5]
    want = expected(prompt, 3)
    core.add_request("stop-id", prompt, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[want[1]]))
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    final = outs["stop-id"][-1]
    assert final.finish_reason == "stop" and final.token_ids == want[:2]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_block_accounting_over_random_schedules(data):
    """Any mix of arrivals, shared prefixes, aborts, failed steps, finishes and preemptions: every finished
    request has exactly the fake model's tokens, and at the end every block is free or cached (ref count 0)."""
    block_size = data.draw(st.integers(1, 5), label="block_size")
    window = data.draw(st.sampled_from([None, 3, 7]), label="window")
    seqs = data.draw(st.integers(1, 4), label="max_num_seqs")
    core, ex = engine(
        max_num_seqs=seqs,
        max_num_batched_tokens=data.draw(st.integers(seqs, 24), label="budget"),
        max_queued_requests=64,
        block_size=block_size,
        num_blocks=data.draw(st.integers(-(-40 // block_size) + 1, 60), label="num_blocks"),
        window=window,
        enable_prefix_caching=data.draw(st.booleans(), label="caching"),
    )
    prefix = [1] + data.draw(st.lists(st.integers(3, VOCAB - 1), max_size=12), label="prefix")
    outs: dict[str, list[RequestOutput]] = {}
    want: dict[str, list[int]] = {}
    for i in range(data.draw(st.integers(1, 10), label="requests")):
        rid = f"r{i}"
        tail = data.draw(st.lists(st.integers(3, VOCAB - 1), max_size=12), label="tail")
        p = (prefix if data.draw(st.booleans(), label="shared") else [1]) + tail
        n = data.draw(st.integers(1, 8), label="max_tokens")
        core.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        want[rid] = expected(p, n, window)
        for _ in range(data.draw(st.integers(0, 3), label="steps")):
            action = data.draw(st.sampled_from(["step", "step", "abort", "fail"]), label="action")
            if action == "abort":
                core.abort(f"r{data.draw(st.integers(0, i), label='victim')}")
            ex.fail_with = RuntimeError("injected") if action == "fail" else None
            for o in core.step():
                outs.setdefault(o.request_id, []).append(o)
            ex.fail_with = None
    drain(core, outs)
    for rid, tokens in want.items():
        final = outs[rid][-1]
        assert final.finished
        if final.finish_reason == "length":
            assert final.token_ids == tokens, rid
        else:
            assert final.finish_reason in ("abort", "error")
            assert final.token_ids == tokens[: len(final.token_ids)], rid
    pool = core.scheduler.pool
    assert pool.num_used == 0 and all(r == 0 for r in pool.ref)
    assert pool.num_free == pool.num_blocks


ACCEPTED_PARAMS = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 6),
    temperature=st.one_of(st.sampled_from([0.0, 1e-40, 1e-6, 100.0]), st.floats(0, 100)),
    top_p=st.one_of(st.just(1e-9), st.floats(1e-6, 1.0)),
    top_k=st.sampled_from([-1, 0, 1, 2, 50, VOCAB]),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.one_of(st.just(1e-9), st.floats(1e-3, 10)),
    min_p=st.floats(0, 1),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=4),
    ignore_eos=st.booleans(),
    logprobs=st.one_of(st.none(), st.integers(0, 20)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=ACCEPTED_PARAMS)
def test_any_accepted_sampling_value_leaves_its_neighbours_alone(params):
    """One request with any accepted sampling values, next to greedy bystanders: the bystanders keep their exact
    tokens and the odd one finishes normally (length or stop), never with an error."""
    core, _ = engine(max_num_seqs=4, max_num_batched_tokens=32)
    bystanders = {f"b{i}": [1, 300 + i, 301 + i] for i in range(3)}
    core.add_request("odd", [1, 77, 78], params)
    for rid, p in bystanders.items():
        core.add_request(rid, p, GREEDY)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    for rid, p in bystanders.items():
        assert outs[rid][-1].token_ids == expected(p, 5)
    odd = outs["odd"][-1]
    assert odd.finish_reason in ("length", "stop") and odd.error is None
    assert all(0 <= t < VOCAB for t in odd.token_ids)


def test_a_burst_sharing_a_prefix_computes_it_once():
    """Requests that arrive together with the same 24-token prefix: the first computes it, the others wait for its
    blocks instead of computing them beside it, then reuse them."""
    prefix = [1] + list(range(600, 623))
    core, ex = engine(max_num_seqs=8, max_num_batched_tokens=64, block_size=4)
    prompts = {f"q{i}": prefix + [700 + i, 701 + i] for i in range(6)}
    for rid, p in prompts.items():
        core.add_request(rid, p, GREEDY)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    for rid, p in prompts.items():
        assert outs[rid][-1].token_ids == expected(p, 5)
    cached = [outs[rid][-1].metrics["cached_tokens"] for rid in prompts]
    assert cached == [0] + [24] * 5
    computed = sum(c.n for b in ex.batches for c in b.chunks if c.n > 1)
    assert computed == 26 + 5 * 2  # the prefix once, each question once
    assert core.stats()["prefix_cache_hits"] == 5 * 6 * 4 and core.stats()["prefix_cache_queries"] == 6 * 6 * 4


class SequenceGrammar:
    """A grammar whose only sentence is a fixed token sequence (spec: the ids, comma-separated)."""

    def matcher(self, spec: StructuredOutput) -> SequenceMatcher:
        if not spec.spec:
            raise SamplingParamsError(param="response_format", message="empty sentence")
        return SequenceMatcher([int(t) for t in spec.spec.split(",")])


class SequenceMatcher:
    def __init__(self, sentence: list[int]) -> None:
        self.sentence, self.pos = sentence, 0

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(VOCAB, dtype=torch.bool)
        mask[self.sentence[self.pos]] = True
        return mask

    def accept(self, token: int) -> None:
        assert token == self.sentence[self.pos]
        self.pos += 1

    @property
    def done(self) -> bool:
        return self.pos == len(self.sentence)


def test_a_grammar_decides_the_tokens_and_ends_the_request():
    core, _ = engine(max_num_seqs=4, max_num_batched_tokens=32)
    core.grammar = SequenceGrammar()
    sentence = SamplingParams(
        max_tokens=10, temperature=0.8, seed=3, structured_output=StructuredOutput("lark", "900,901,902")
    )
    core.add_request("g", [1, 5], sentence)
    core.add_request("plain", [1, 6], GREEDY)
    with pytest.raises(SamplingParamsError) as err:
        core.add_request("bad", [1, 7], SamplingParams(structured_output=StructuredOutput("lark", "")))
    assert err.value.param == "response_format"
    # a grammar that needs token 2 (EOS) while min_tokens forbids it: that request alone fails, with a clear error
    stuck = SamplingParams(max_tokens=5, min_tokens=3, structured_output=StructuredOutput("lark", "2"))
    core.add_request("stuck", [1, 8], stuck)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert outs["g"][-1].token_ids == [900, 901, 902] and outs["g"][-1].finish_reason == "stop"
    assert outs["plain"][-1].token_ids == expected([1, 6], 5)
    assert outs["stuck"][-1].finish_reason == "error"
    assert isinstance(outs["stuck"][-1].error, InvalidRequestError)
    assert outs["stuck"][-1].error.param == "response_format"
    nogrammar, _ = engine()
    with pytest.raises(InvalidRequestError, match="not available"):
        nogrammar.add_request("x", [1, 5], sentence)


def test_first_step_marks_batches_whose_requests_ran_no_step_before():
    """A batch of requests in their first step (a cached prefix does not count) says so: the expert client may then
    take restarted workers as they are; any batch with a request that ran before does not."""
    shared = [1] + list(range(200, 219))  # 5 full blocks of 4: cached for the second request
    core, ex = engine(max_num_seqs=4, max_num_batched_tokens=8)
    core.add_request("a", shared, GREEDY)  # 20 tokens: 3 prefill chunks of 8, then decodes
    drain(core)
    assert [b.first_step for b in ex.batches] == [True] + [False] * (len(ex.batches) - 1)
    n = len(ex.batches)
    core.add_request("b", shared + [9], GREEDY)  # prefix cached: its first chunk starts at 20, still its first step
    core.step()
    assert ex.batches[n].chunks[0].start == 20 and ex.batches[n].first_step
    core.add_request("c", [1, 5, 6], GREEDY)  # joins b, which ran a step before
    core.step()
    assert not ex.batches[n + 1].first_step
    drain(core)
