"""The continuous-batching engine: batch invariance, abort, overload, validation, stops, seeds, logprobs, stats and
streaming.

Every check compares against something computed another way: a request run alone on a separate engine (no
chunking, no neighbours), ``logits()`` over the whole sequence, or ``Tokenizer.decode``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
from pathlib import Path

import pytest
import torch

from cluster.checkpoint.tiny_model import TinyModelSpec, random_weights, write_checkpoint, write_tiny_model
from cluster.config.dtype import FAST_BF16_ENV
from cluster.engine import AsyncEngine, EngineCore, RequestOutput
from cluster.engine.sampling import SamplingParams
from cluster.errors import EngineOverloadedError, EngineStoppedError, InvalidRequestError, PromptTooLongError
from cluster.runtime.frontend import ClusterConfig, Frontend, build_frontend
from cluster.text.tokenizer import Tokenizer, default_model_file

SPEC = TinyModelSpec(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, max_position_embeddings=512)
WINDOW = 8
EOS = 2
TIMEOUT = 30  # seconds any single async wait may take before the test fails instead of hanging


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-models")
    out = {
        "plain": write_tiny_model(root / "plain", SPEC, seed=0),
        "swa": write_tiny_model(root / "swa", dataclasses.replace(SPEC, sliding_window=WINDOW), seed=1),
    }
    # A model that emits EOS often: every embedding has a large component on dimension 0 and lm_head's EOS row
    # reads it, so EOS is the greedy choice and has a few percent probability when sampling.
    config = SPEC.config()
    w = random_weights(config, seed=2)
    w["model.embed_tokens.weight"][:, 0] += 10.0
    w["lm_head.weight"][EOS, 0] = 1.0
    out["eos"] = write_checkpoint(root / "eos", config, w)
    # A model that mostly emits byte-fallback pieces of multi-byte UTF-8 characters (and ASCII words between), in
    # random order: streams full of incomplete and invalid UTF-8 that the detokenizer must hold back.
    w = random_weights(config, seed=3)
    w["model.embed_tokens.weight"][:, 0] += 10.0
    w["lm_head.weight"][byte_heavy_ids(), 0] = 1.2
    out["bytes"] = write_checkpoint(root / "bytes", config, w)
    return out


def byte_heavy_ids() -> list[int]:
    tok = Tokenizer(default_model_file())
    by_byte = {tok.byte_value(i): i for i in range(tok.vocab_size) if tok.byte_value(i) is not None}
    raw = "中é😀".encode()  # 3-, 2- and 4-byte characters
    words = tok.encode(" the cat", bos=False)
    return sorted({by_byte[b] for b in raw} | set(words))


def frontend(folder: Path, **engine) -> Frontend:
    return build_frontend(ClusterConfig.create(model=str(folder), attention_backend="sdpa", **engine), progress=False)


class Alone:
    """Each request run by itself on its own engine: one slot, the whole prompt prefilled in one step."""

    def __init__(self, models: dict[str, Path]) -> None:
        self._models = models
        self._fe: dict[str, Frontend] = {}
        self._memo: dict[tuple, RequestOutput] = {}

    def __call__(self, model: str, prompt: list[int], params: SamplingParams) -> RequestOutput:
        key = (model, tuple(prompt), params)
        if key not in self._memo:
            if model not in self._fe:
                self._fe[model] = frontend(self._models[model], max_num_seqs=1, max_num_batched_tokens=512)
            fe = self._fe[model]
            assert fe.core.stats()["running"] == 0
            out = fe.core.generate([prompt], [params])[0]
            if params.greedy:  # greedy really is the argmax of the model's logits, computed the other way
                rows = fe.core.logits(prompt + out.token_ids)[len(prompt) - 1 :]
                for j, t in enumerate(out.token_ids):
                    assert rows[j, t] >= rows[j].max() - 1e-5, (model, j)
            self._memo[key] = out
        return self._memo[key]

    def tokenizer(self, model: str) -> Tokenizer:
        return self._fe[model].tokenizer


@pytest.fixture(scope="module")
def alone(models) -> Alone:
    return Alone(models)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [1] + [rng.randrange(3, 32000) for _ in range(n - 1)]


@pytest.mark.parametrize(("fast_bf16", "want"), [("0", torch.float32), ("1", None)])
def test_a_bfloat16_model_attends_in_float32_on_a_cpu_without_bf16_units(models, monkeypatch, fast_bf16, want):
    """The frontend builds its attention to compute in float32 where torch's bfloat16 attention is emulated (a
    bfloat16 model on a CPU without bf16 units), and in bfloat16 where the CPU has them."""
    monkeypatch.setenv(FAST_BF16_ENV, fast_bf16)
    fe = frontend(models["plain"], dtype="bfloat16", max_num_seqs=1)
    assert all(layer.self_attn.attention.compute_dtype == want for layer in fe.model.layers)
    out = fe.core.generate([[1, 5, 9]], [SamplingParams(max_tokens=3, temperature=0)])[0]
    assert len(out.token_ids) == 3 and out.error is None


PROMPT_LENS = [1, 2, 3, 5, 8, 13, 21, 31, 32, 33, 40, 47, 64, 70, 12, 25]
MAX_TOKENS = [1, 24, 3, 17, 9, 20, 5, 12, 2, 16, 7, 11, 19, 4, 22, 8]


def sixteen_requests(seed: int = 0) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [
        (f"r{i:02d}", random_prompt(rng, n), SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for i, (n, m) in enumerate(zip(PROMPT_LENS, MAX_TOKENS, strict=True))
    ]


class StepSpy:
    """Wraps the runner's ``execute`` to record the chunks of every step."""

    def __init__(self, fe: Frontend) -> None:
        self.steps: list[list[tuple[int, int, int]]] = []
        self._execute = fe.runner.execute
        fe.runner.execute = self

    def __call__(self, batch):
        self.steps.append([(c.blocks[0] if c.blocks else -1, c.start, c.n) for c in batch.chunks])
        return self._execute(batch)

    def saw_chunked_prefill_beside_decodes(self) -> bool:
        """Some step continued a prompt (start > 0, several tokens) while another sequence decoded one token."""
        return any(
            any(n > 1 and start > 0 for _, start, n in s) and any(n == 1 and start > 0 for _, start, n in s)
            for s in self.steps
        )


def drain(core: EngineCore, outs: dict[str, list[RequestOutput]], max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not core.has_work():
            return
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish")


def check_stream(outs: list[RequestOutput]) -> RequestOutput:
    """The per-step outputs of one request are consistent deltas of its final output; returns the final one."""
    final = outs[-1]
    assert final.finished and all(not o.finished for o in outs[:-1])
    assert [t for o in outs for t in o.new_token_ids] == final.token_ids
    assert "".join(o.delta_text for o in outs) == final.text
    text = ""
    for o in outs:
        text += o.delta_text
        assert o.text == text
    return final


def run_async(core: EngineCore, main):
    """Run ``main(engine)`` on a fresh AsyncEngine over ``core``; always shut the engine down."""
    engine = AsyncEngine(core)
    try:
        return asyncio.run(asyncio.wait_for(main(engine), TIMEOUT))
    finally:
        engine.shutdown()


async def collect(engine: AsyncEngine, prompt, params, request_id=None, on_output=None) -> list[RequestOutput]:
    stream = await engine.generate(prompt, params, request_id=request_id)
    outs = []
    async for o in stream:
        outs.append(o)
        if on_output is not None:
            on_output(o)
    return outs


# ---------------------------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("model", ["plain", "swa"])
def test_staggered_batch_matches_alone(models, alone, model):
    """16 greedy requests joining at different steps, long prompts prefilled in 32-token chunks while others
    decode, 5 slots so most wait: every request gets exactly the tokens it gets alone."""
    reqs = sixteen_requests()
    if model == "swa":
        assert any(len(p) + sp.max_tokens > 3 * WINDOW for _, p, sp in reqs)
    fe = frontend(models[model], max_num_seqs=5, max_num_batched_tokens=32)
    spy = StepSpy(fe)
    core = fe.core
    outs: dict[str, list[RequestOutput]] = {}
    waves = [(0, reqs[:4]), (3, reqs[4:9]), (5, reqs[9:13]), (2, reqs[13:])]  # (steps before the wave, requests)
    saw_full = False
    for steps, wave in waves:
        for _ in range(steps):
            for o in core.step():
                outs.setdefault(o.request_id, []).append(o)
            s = core.stats()
            saw_full |= s["running"] == 5 and s["waiting"] > 0
        for rid, prompt, sp in wave:
            core.add_request(rid, prompt, sp)
    drain(core, outs)
    assert saw_full, "the test should have filled every slot with requests waiting"
    assert spy.saw_chunked_prefill_beside_decodes()
    for rid, prompt, sp in reqs:
        final = check_stream(outs[rid])
        ref = alone(model, prompt, sp)
        assert final.token_ids == ref.token_ids, rid
        assert len(final.token_ids) == sp.max_tokens and final.finish_reason == "length"
        assert final.prompt_token_ids == prompt
    assert fe.core.kv_blocks_used == 0


@pytest.mark.parametrize("model", ["plain", "swa"])
def test_async_staggered_batch_matches_alone(models, alone, model):
    """The same through AsyncEngine: tasks start in three waves, each when a request of the previous wave has
    streamed two tokens, so they join running batches mid-decode."""
    reqs = sixteen_requests(seed=1)
    fe = frontend(models[model], max_num_seqs=6, max_num_batched_tokens=32)
    waves = [reqs[:5], reqs[5:11], reqs[11:]]

    async def main(engine):
        started = [asyncio.Event() for _ in waves]
        started[0].set()

        def on_output(wave):
            def cb(o):
                if wave + 1 < len(waves) and len(o.token_ids) >= 2:
                    started[wave + 1].set()

            return cb

        async def one(wave, rid, prompt, sp):
            await started[wave].wait()
            return rid, await collect(engine, prompt, sp, request_id=rid, on_output=on_output(wave))

        tasks = [one(w, *r) for w, wave in enumerate(waves) for r in wave]
        # A request of max_tokens 1 cannot trigger the next wave: make sure each wave has a longer one.
        assert all(any(sp.max_tokens >= 2 for _, _, sp in wave) for wave in waves)
        return dict(await asyncio.gather(*tasks))

    results = run_async(fe.core, main)
    for rid, prompt, sp in reqs:
        final = check_stream(results[rid])
        assert final.token_ids == alone(model, prompt, sp).token_ids, rid
    assert fe.core.kv_blocks_used == 0


def test_sliding_window_bounds_what_generation_sees(models):
    """With window W and 2 layers, the token at position q depends only on positions > q - 2 (W - 1). Prompts that
    differ only before that reach generate the same tokens (through chunked prefill and the rolling buffer); one
    that differs just inside it does not get the same logits."""
    reach = SPEC.layers * (WINDOW - 1)
    rng = random.Random(11)
    prompt = random_prompt(rng, 40)
    far = [1] + [rng.randrange(3, 32000) for _ in range(len(prompt) - reach - 2)] + prompt[len(prompt) - reach - 1 :]
    near = list(prompt)
    near[len(prompt) - reach - 1] += 1  # the farthest position the last prompt token still sees
    assert len(far) == len(prompt) and far[len(prompt) - reach - 1 :] == prompt[len(prompt) - reach - 1 :]
    assert far[len(prompt) - reach - 2] != prompt[len(prompt) - reach - 2]  # just outside the reach
    fe = frontend(models["swa"], max_num_seqs=4, max_num_batched_tokens=16)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=3)
    a, b, c, _ = fe.core.generate([prompt, far, near, random_prompt(rng, 20)], [sp] * 4)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    assert abs(a.logprobs[0].logprob - c.logprobs[0].logprob) > 1e-4


# ---------------------------------------------------------------------------------------------- abort


LONG = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)


def test_abort_frees_slot_for_waiting_request(models, alone):
    fe = frontend(models["plain"], max_num_seqs=3, max_num_batched_tokens=32)
    core = fe.core
    rng = random.Random(3)
    prompts = {rid: random_prompt(rng, 6) for rid in "abcde"}
    for rid in "abc":
        core.add_request(rid, prompts[rid], LONG)
    outs: dict[str, list[RequestOutput]] = {}

    def step():
        got = core.step()
        for o in got:
            outs.setdefault(o.request_id, []).append(o)
        return {o.request_id: o for o in got}

    assert set(step()) == {"a", "b", "c"}
    d_params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    core.add_request("d", prompts["d"], d_params)
    assert core.stats()["waiting"] == 1
    for _ in range(2):
        assert set(step()) == {"a", "b", "c"}  # every slot is busy: d waits
    assert core.stats()["running"] == 3 and core.stats()["waiting"] == 1

    core.abort("a")
    got = step()
    # The abort is applied before scheduling: in the very same step d is admitted and gets its first token.
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"].finished and got["a"].finish_reason == "abort" and got["a"].new_token_ids == []
    assert got["a"].token_ids == [t for o in outs["a"][:-1] for t in o.new_token_ids]
    assert not got["b"].finished and not got["c"].finished
    assert got["d"].token_ids and not got["d"].finished
    assert core.stats()["running"] == 3 and core.stats()["waiting"] == 0

    # Abort of a waiting request: it never gets a slot and ends with no tokens.
    core.add_request("e", prompts["e"], LONG)
    assert core.stats()["waiting"] == 1
    core.abort("e")
    core.abort("e")  # twice before the step: still one final output
    core.abort("no-such-request")  # unknown ids are ignored
    got = step()
    assert got["e"].finished and got["e"].finish_reason == "abort" and got["e"].token_ids == []
    assert got["e"].text == "" and got["e"].metrics.get("ttft") is None
    assert core.stats()["waiting"] == 0 and core.stats()["running"] == 3
    assert [o.request_id for o in outs["e"]] == ["e"]

    for rid in "bc":
        core.abort(rid)
    drain(core, outs)
    # d reused a's slot: stale keys and values of a must not leak into it.
    assert check_stream(outs["d"]).token_ids == alone("plain", prompts["d"], d_params).token_ids
    assert outs["d"][-1].finish_reason == "length"
    core.abort("d")  # finished already: nothing happens
    assert core.step() == []
    assert fe.core.kv_blocks_used == 0
    assert core.stats()["finished_abort"] == 4  # a, b, c, e


def test_abort_during_chunked_prefill(models, alone):
    fe = frontend(models["plain"], max_num_seqs=1, max_num_batched_tokens=16)
    core = fe.core
    rng = random.Random(12)
    core.add_request("long", random_prompt(rng, 70), LONG)  # 5 steps of prefill
    assert core.step() == [] and core.step() == []
    assert core.stats()["running"] == 1
    prompt = random_prompt(rng, 30)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    core.add_request("next", prompt, sp)
    core.abort("long")
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert [o.finish_reason for o in outs["long"]] == ["abort"] and outs["long"][0].token_ids == []
    # The slot still holds half a prompt of "long": "next" must not see it.
    assert check_stream(outs["next"]).token_ids == alone("plain", prompt, sp).token_ids
    assert fe.core.kv_blocks_used == 0


def test_async_abort_frees_slot_at_once(models):
    """Fill every slot; cancelling a consumer task, breaking out of the iteration and engine.abort() each end a
    request and a queued one starts streaming while the others are still running."""
    fe = frontend(models["plain"], max_num_seqs=3, max_num_batched_tokens=32)
    core = fe.core
    rng = random.Random(4)
    prompts = {rid: random_prompt(rng, 5) for rid in "abcdefg"}

    async def main(engine):
        outs = {rid: [] for rid in prompts}
        first = {rid: asyncio.Event() for rid in prompts}
        breaks = {rid: False for rid in prompts}
        snapshot = {}

        async def consume(rid, params):
            stream = await engine.generate(prompts[rid], params, request_id=rid)
            async for o in stream:
                outs[rid].append(o)
                if len(outs[rid]) == 1:
                    # What else is running at the moment this request's first token arrives.
                    snapshot[rid] = (core.stats(), {r: bool(v) and not v[-1].finished for r, v in outs.items()})
                first[rid].set()
                if breaks[rid]:
                    break  # leaves the iteration: the stream is closed when this coroutine returns

        async def wait_first(*rids):
            await asyncio.gather(*(first[r].wait() for r in rids))

        tasks = {rid: asyncio.create_task(consume(rid, LONG)) for rid in "abc"}
        await wait_first("a", "b", "c")
        assert core.stats()["running"] == 3

        # 1. cancel a's task: d, queued behind the full batch, starts.
        tasks["d"] = asyncio.create_task(consume("d", LONG))
        n_b = len(outs["b"])
        while len(outs["b"]) < n_b + 3:  # let a few steps go by with d waiting
            await asyncio.sleep(0.005)
        assert not outs["d"] and core.stats()["waiting"] == 1
        tasks["a"].cancel()
        await wait_first("d")
        stats, running = snapshot["d"]
        assert running["b"] and running["c"]  # a is gone, its slot is d's
        assert stats["running"] == 3 and stats["waiting"] == 0
        assert not outs["a"][-1].finished  # a's consumer never saw an end: it left

        # 2. b's consumer breaks out of its loop: e starts.
        tasks["e"] = asyncio.create_task(consume("e", LONG))
        while core.stats()["waiting"] != 1:
            await asyncio.sleep(0.001)
        breaks["b"] = True
        await wait_first("e")
        await tasks["b"]
        stats, running = snapshot["e"]
        assert running["c"] and running["d"]
        assert stats["running"] == 3

        # 3. engine.abort(c): c's stream ends with finish_reason "abort"; f starts.
        tasks["f"] = asyncio.create_task(consume("f", LONG))
        while core.stats()["waiting"] != 1:
            await asyncio.sleep(0.001)
        engine.abort("c")
        await wait_first("f")
        await tasks["c"]
        assert outs["c"][-1].finished and outs["c"][-1].finish_reason == "abort"
        stats, running = snapshot["f"]
        assert running["d"] and running["e"] and stats["running"] == 3

        # 4. a waiting request aborted with engine.abort: one final output, no tokens.
        tasks["g"] = asyncio.create_task(consume("g", LONG))
        while core.stats()["waiting"] != 1:
            await asyncio.sleep(0.001)
        engine.abort("g")
        await tasks["g"]
        assert len(outs["g"]) == 1 and outs["g"][0].finish_reason == "abort" and outs["g"][0].token_ids == []

        for rid in "def":
            engine.abort(rid)
        await asyncio.gather(*(tasks[r] for r in "cdefg"))
        with pytest.raises(asyncio.CancelledError):
            await tasks["a"]
        while core.has_work():
            await asyncio.sleep(0.001)
        for rid in "cdefg":
            assert outs[rid][-1].finish_reason == "abort"

    run_async(core, main)
    assert fe.core.kv_blocks_used == 0
    assert core.stats()["finished_abort"] == 7


def test_async_shutdown_ends_open_streams(models):
    fe = frontend(models["plain"], max_num_seqs=1, max_num_batched_tokens=16)
    engine = AsyncEngine(fe.core)

    async def main():
        first = asyncio.Event()
        running = asyncio.create_task(collect(engine, [1, 5, 6], LONG, on_output=lambda o: first.set()))
        queued = asyncio.create_task(collect(engine, [1, 7, 8], LONG))
        await asyncio.wait_for(first.wait(), TIMEOUT)
        await asyncio.to_thread(engine.shutdown)
        for task in (running, queued):
            outs = await asyncio.wait_for(task, 10)
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert isinstance(outs[-1].error, EngineStoppedError)
        with pytest.raises(EngineStoppedError):
            await engine.generate([1, 2, 3], LONG)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert fe.core.kv_blocks_used == 0


# ---------------------------------------------------------------------------------------------- admission errors


def test_overload_fails_immediately(models):
    fe = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=16, max_queued_requests=2)
    core = fe.core
    sp = LONG  # nothing finishes while the AsyncEngine below steps the core
    for rid in ("run0", "run1"):
        core.add_request(rid, [1, 10, 11], sp)
    core.step()
    assert core.stats()["running"] == 2
    core.add_request("wait0", [1, 12], sp)
    core.add_request("wait1", [1, 13], sp)
    with pytest.raises(EngineOverloadedError) as err:  # no step in between: the 3rd waiting request fails at once
        core.add_request("wait2", [1, 14], sp)
    assert "overloaded" in str(err.value)
    assert core.stats()["waiting"] == 2 and core.stats()["rejected_overload"] == 1

    async def main(engine):
        with pytest.raises(EngineOverloadedError):
            await engine.generate([1, 15], sp, request_id="async-wait2")

    run_async(core, main)  # (shutting down aborts nothing here: none of these are AsyncEngine streams)
    # A rejected request leaves nothing behind: freeing a queue place lets the same id in.
    core.abort("wait0")
    core.step()
    core.add_request("wait2", [1, 14], sp)
    assert core.stats()["waiting"] == 2
    for rid in ("run0", "run1", "wait1", "wait2"):
        core.abort(rid)
    drain(core, {})
    assert fe.core.kv_blocks_used == 0


def test_overload_counts_only_requests_without_a_slot(models):
    """Before any step, max_num_seqs requests will get a free slot: only the ones beyond are queued."""
    fe = frontend(models["plain"], max_num_seqs=3, max_num_batched_tokens=16, max_queued_requests=2)
    core = fe.core
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(5):
        core.add_request(f"r{i}", [1, 20 + i], sp)
    with pytest.raises(EngineOverloadedError):
        core.add_request("r5", [1, 30], sp)
    outs: dict[str, list[RequestOutput]] = {}
    drain(core, outs)
    assert sorted(outs) == [f"r{i}" for i in range(5)]
    assert all(v[-1].finish_reason == "length" for v in outs.values())


def test_prompt_too_long_and_invalid_prompts_fail_immediately(models):
    fe = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)
    core = fe.core
    assert core.max_model_len == 64
    with pytest.raises(PromptTooLongError) as err:
        core.add_request("long", [1] * 60, SamplingParams(max_tokens=5))
    msg = str(err.value)
    for number in ("64", "60", "5", "65"):  # the limit, the prompt, max_tokens and their sum
        assert re.search(rf"\b{number}\b", msg), msg
    assert err.value.param == "max_tokens"
    with pytest.raises(PromptTooLongError) as err:
        core.add_request("long2", [1] * 70, SamplingParams(max_tokens=1))
    assert "70" in str(err.value) and "64" in str(err.value) and err.value.param == "prompt"

    bad = {"empty": [], "too-big": [1, 32000], "negative": [1, -1], "float": [1, 2.0], "bool": [1, True]}
    for rid, prompt in bad.items():
        with pytest.raises(InvalidRequestError) as err:
            core.add_request(rid, prompt, SamplingParams())
        assert err.value.param == "prompt", rid
        assert not isinstance(err.value, PromptTooLongError)
    assert core.stats()["waiting"] == 0 and not core.has_work()

    async def main(engine):
        with pytest.raises(PromptTooLongError):
            await engine.generate([1] * 60, SamplingParams(max_tokens=5))
        with pytest.raises(InvalidRequestError):
            await engine.generate([], SamplingParams())
        # Exactly max_model_len fits, and runs to the last position of the cache.
        outs = await collect(engine, [1] * 60, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(outs[-1].token_ids) == 4 and outs[-1].finish_reason == "length"

    run_async(core, main)


def test_request_id_in_use_is_refused_without_disturbing_its_stream(models):
    fe = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=16)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def main(engine):
        stream = await engine.generate([1, 5], sp, request_id="dup")
        with pytest.raises(InvalidRequestError) as err:
            await engine.generate([1, 6], sp, request_id="dup")
        assert err.value.param == "request_id"
        got = await asyncio.wait_for(asyncio.ensure_future(_drain_stream(stream)), 10)
        assert got[-1].finished and len(got[-1].token_ids) == 8
        # Once finished, the id is free again.
        again = await collect(engine, [1, 6], sp, request_id="dup")
        assert again[-1].finished

    run_async(fe.core, main)
    fe.core.add_request("x", [1, 5], sp)
    with pytest.raises(InvalidRequestError):  # the core refuses an id that is queued or running too
        fe.core.add_request("x", [1, 5], sp)


async def _drain_stream(stream) -> list[RequestOutput]:
    return [o async for o in stream]


# ---------------------------------------------------------------------------------------------- stops


def greedy_ref(alone, model, prompt, n):
    return alone(model, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def test_eos_stops_unless_ignore_eos(models, alone):
    prompt = [1, 415, 2936, 9060]
    out = greedy_ref(alone, "eos", prompt, 5)
    assert out.token_ids[0] == EOS  # the greedy choice of this model
    fe = frontend(models["eos"], max_num_seqs=4, max_num_batched_tokens=32)
    greedy, ignoring = fe.core.generate(
        [prompt, prompt],
        [SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)],
    )
    assert greedy.token_ids == [EOS] and greedy.finish_reason == "stop" and greedy.text == ""
    assert ignoring.token_ids == out.token_ids and ignoring.finish_reason == "length"

    # Sampling: EOS somewhere in the middle ends the request there; with ignore_eos the same seed goes on.
    for seed in range(100):
        sp = SamplingParams(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True)
        full = alone("eos", prompt, sp).token_ids
        if EOS in full[3:] and EOS not in full[:3]:
            break
    else:
        pytest.fail("no seed put EOS in the middle")
    cut = full.index(EOS)
    out = fe.core.generate([prompt], [SamplingParams(max_tokens=40, temperature=1.0, seed=seed)])[0]
    assert out.token_ids == full[: cut + 1] and out.finish_reason == "stop"
    assert out.text == fe.tokenizer.decode(full[:cut])


def test_stop_token_ids(models, alone):
    prompt = random_prompt(random.Random(5), 9)
    ref = greedy_ref(alone, "plain", prompt, 30).token_ids
    k = next(i for i in range(4, 30) if ref[i] not in ref[:i] and ref[i] != EOS)
    fe = frontend(models["plain"], max_num_seqs=4, max_num_batched_tokens=32)
    out, other = fe.core.generate(
        [prompt, prompt],
        [
            SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[ref[k], 31999]),
            SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        ],
    )
    assert out.token_ids == ref[: k + 1] and out.finish_reason == "stop"
    assert out.text == fe.tokenizer.decode(ref[:k])  # the stop token's own text is not returned
    assert other.token_ids == ref and other.finish_reason == "length"


def test_max_tokens_gives_length(models):
    fe = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=16)
    for n in (1, 2, 7):
        out = fe.core.generate([[1, 300, 400]], [SamplingParams(max_tokens=n, temperature=0.7, seed=n)])[0]
        assert len(out.token_ids) == n and out.finish_reason == "length"


def stop_string_case(tokenizer, ref: list[int], span: int):
    """A stop string from the greedy text that crosses token boundaries: it starts 2 characters before the end
    of token i and ends 1 character into token i + span, so all but its last character are known one token before
    it completes. Returns (stop, cut, tokens up to the one completing it)."""
    full = tokenizer.decode(ref)
    bounds = [len(tokenizer.decode(ref[:j])) for j in range(len(ref) + 1)]
    for i in range(3, len(ref) - span):
        pieces = [full[bounds[j] : bounds[j + 1]] for j in range(i, i + span + 1)]
        if not all(full.startswith(tokenizer.decode(ref[:j])) for j in range(i, i + span + 2)):
            continue  # byte pieces: text boundaries are not token boundaries here
        if len(pieces[0]) < 3 or len(pieces[-1]) < 3:
            continue
        start, end = bounds[i + 1] - 2, bounds[i + span] + 1
        stop = full[start:end]
        if full.find(stop) == start and stop.strip() == stop:
            return stop, start, i + span + 1
    raise AssertionError("no usable stop string in the greedy text")


@pytest.mark.parametrize("span", [1, 2, 3])
def test_stop_string_across_tokens_streamed(models, alone, span):
    prompt = random_prompt(random.Random(6), 7)
    ref_out = greedy_ref(alone, "plain", prompt, 40)
    tok = alone.tokenizer("plain")
    assert ref_out.text == tok.decode(ref_out.token_ids)
    stop, cut, n_tokens = stop_string_case(tok, ref_out.token_ids, span)
    full = ref_out.text
    fe = frontend(models["plain"], max_num_seqs=4, max_num_batched_tokens=32)
    assert "zq" not in full
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=["zq", stop])  # the longest decides

    async def main(engine):
        # Neighbours in the batch, to be sure nothing of theirs leaks in. Their stop strings never match and they
        # end by length: the text held back in case it started a stop string must come out at the end.
        others = [
            collect(
                engine,
                random_prompt(random.Random(k), 5 + k),
                SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=["zq", "no such text here"]),
            )
            for k in range(2)
        ]
        return await asyncio.gather(collect(engine, prompt, params), *others)

    outs, *neighbours = run_async(fe.core, main)
    for n in neighbours:
        done = check_stream(n)
        assert done.finish_reason == "length" and done.text == tok.decode(done.token_ids) and done.text
    final = check_stream(outs)
    deltas = [o.delta_text for o in outs]
    assert final.finish_reason == "stop"
    assert final.text == full[:cut]
    assert "".join(deltas) == full[:cut]
    assert all(stop not in d for d in deltas) and stop not in "".join(deltas)
    assert final.token_ids == ref_out.token_ids[:n_tokens]


def test_stop_string_at_the_last_token_and_earliest_stop_wins(models, alone):
    prompt = random_prompt(random.Random(6), 7)
    ref = greedy_ref(alone, "plain", prompt, 40)
    tok = alone.tokenizer("plain")
    stop1, cut1, n1 = stop_string_case(tok, ref.token_ids, 1)
    fe = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=32)
    # The stop string completes on the very last allowed token: "stop", not "length".
    out = fe.core.generate([prompt], [SamplingParams(max_tokens=n1, temperature=0, ignore_eos=True, stop=[stop1])])[0]
    assert out.finish_reason == "stop" and out.text == ref.text[:cut1] and len(out.token_ids) == n1
    # Two stop strings: the one that appears first in the text wins, whatever their order in the list.
    later = ref.text[cut1 + len(stop1) + 3 : cut1 + len(stop1) + 6]
    assert len(later) == 3 and ref.text.find(later) > cut1
    out = fe.core.generate(
        [prompt], [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[later, stop1])]
    )[0]
    assert out.finish_reason == "stop" and out.text == ref.text[:cut1]


# ---------------------------------------------------------------------------------------------- seeded sampling


def test_seeded_sampling_is_batch_invariant(models, alone):
    rng = random.Random(7)
    prompt = random_prompt(rng, 20)
    mine = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    ref = alone("plain", prompt, mine).token_ids
    assert len(set(ref)) > 4  # really sampled, not stuck on one token

    others = [
        (random_prompt(rng, 33), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)),
        (random_prompt(rng, 4), SamplingParams(max_tokens=20, temperature=1.2, seed=99, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=4321, ignore_eos=True)),
        (random_prompt(rng, 9), SamplingParams(max_tokens=18, temperature=0.7, ignore_eos=True)),  # no seed
    ]
    # Batch 1: everything added at once, mine in the middle.
    fe = frontend(models["plain"], max_num_seqs=5, max_num_batched_tokens=32)
    batch = others[:2] + [(prompt, mine)] + others[2:]
    res = fe.core.generate([p for p, _ in batch], [sp for _, sp in batch])
    assert res[2].token_ids == ref
    assert res[0].token_ids == alone("plain", *others[0]).token_ids  # greedy neighbour unaffected
    assert res[3].token_ids != ref  # another seed, same prompt: different tokens
    # Batch 2: two slots, mine joins after a few steps, behind the others.
    fe2 = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=16)
    core = fe2.core
    for i, (p, sp) in enumerate(others):
        core.add_request(f"o{i}", p, sp)
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(3):
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
    core.add_request("mine", prompt, mine)
    drain(core, outs)
    assert check_stream(outs["mine"]).token_ids == ref
    assert outs["o1"][-1].token_ids == alone("plain", *others[1]).token_ids
    # And through the async engine, beside the same neighbours.
    fe3 = frontend(models["plain"], max_num_seqs=3, max_num_batched_tokens=32)

    async def main(engine):
        return await asyncio.gather(collect(engine, prompt, mine), *(collect(engine, p, sp) for p, sp in others))

    assert run_async(fe3.core, main)[0][-1].token_ids == ref


# ---------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("model", ["plain", "swa"])
def test_logprobs_match_full_sequence_logits(models, model):
    rng = random.Random(8)
    fe = frontend(models[model], max_num_seqs=3, max_num_batched_tokens=32)
    reqs = [
        ("greedy", random_prompt(rng, 40), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=5)),
        ("sampled", random_prompt(rng, 6), SamplingParams(max_tokens=12, temperature=1.0, seed=3, logprobs=3)),
        ("zero", random_prompt(rng, 11), SamplingParams(max_tokens=6, temperature=0, logprobs=0)),
        ("none", random_prompt(rng, 3), SamplingParams(max_tokens=6, temperature=0)),
    ]
    core = fe.core
    outs: dict[str, list[RequestOutput]] = {}
    core.add_request(*reqs[1])
    core.add_request(*reqs[3])
    for _ in range(2):
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
    core.add_request(*reqs[0])  # chunked prefill beside decodes
    core.add_request(*reqs[2])
    drain(core, outs)
    assert outs["none"][-1].logprobs is None and all(o.new_logprobs is None for o in outs["none"])
    for rid, prompt, sp in reqs[:3]:
        final = check_stream(outs[rid])
        lps = final.logprobs
        assert [lp for o in outs[rid] for lp in o.new_logprobs] == lps
        assert len(lps) == len(final.token_ids)
        ref = torch.log_softmax(fe.core.logits(prompt + final.token_ids).double(), dim=-1)  # independent path
        for j, (tok, lp) in enumerate(zip(final.token_ids, lps, strict=True)):
            row = ref[len(prompt) - 1 + j]
            assert lp.token_id == tok
            assert abs(lp.logprob - row[tok].item()) < 1e-4, (rid, j)
            assert len(lp.top) == sp.logprobs
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            best = torch.topk(row, sp.logprobs).values.tolist() if sp.logprobs else []
            assert values == pytest.approx(best, abs=1e-4)
            for t, v in lp.top:
                assert abs(row[t].item() - v) < 1e-4
            if sp.greedy and sp.logprobs:
                assert lp.top[0][0] == tok
            assert lp.logprob <= 0 and math.isfinite(lp.logprob)


# ---------------------------------------------------------------------------------------------- stats


def test_stats_and_observers(models):
    fe = frontend(models["plain"], max_num_seqs=2, max_num_batched_tokens=16)
    core = fe.core
    seen: list[tuple[str, float]] = []
    core.observers.append(lambda name, value: seen.append((name, value)))
    core.observers.append(lambda name, value: 1 / 0)  # a broken observer does not break the engine
    rng = random.Random(9)
    reqs = {
        f"s{i}": (random_prompt(rng, 3 + i), SamplingParams(max_tokens=m, temperature=0, ignore_eos=True))
        for i, m in enumerate([3, 5, 4, 6])
    }
    for rid, (p, sp) in reqs.items():
        core.add_request(rid, p, sp)
    assert core.stats()["running"] == 0 and core.stats()["waiting"] == 4
    started: set[str] = set()
    done: set[str] = set()
    outs: dict[str, list[RequestOutput]] = {}
    max_running = 0
    while core.has_work():
        for o in core.step():  # prompts fit the budget: admitted in a step = first token in that step
            outs.setdefault(o.request_id, []).append(o)
            started.add(o.request_id)
            if o.finished:
                done.add(o.request_id)
        s = core.stats()
        assert s["running"] == len(started - done) == core.num_running
        assert s["waiting"] == len(reqs) - len(started) == core.num_waiting
        max_running = max(max_running, s["running"])
    assert max_running == 2
    s = core.stats()
    assert s["requests_added"] == 4 and s["finished_length"] == 4
    assert s["generation_tokens"] == sum(sp.max_tokens for _, sp in reqs.values())
    assert s["prompt_tokens"] == sum(len(p) for p, _ in reqs.values())
    ttft = [v for n, v in seen if n == "ttft"]
    itl = [v for n, v in seen if n == "itl"]
    assert len(ttft) == 4 and len(itl) == sum(sp.max_tokens - 1 for _, sp in reqs.values())
    assert all(v >= 0 for v in ttft + itl)
    for rid in reqs:
        assert outs[rid][-1].metrics["ttft"] >= 0 and "arrival" in outs[rid][-1].metrics

    # The same counts while an AsyncEngine runs them: observed from the event loop.
    async def main(engine):
        seen.clear()
        sp = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        first = asyncio.Event()
        tasks = [
            asyncio.create_task(
                collect(
                    engine,
                    [1, 40 + i],
                    sp,
                    request_id=f"a{i}",
                    on_output=lambda o: len(o.token_ids) >= 3 and first.set(),
                )
            )
            for i in range(3)
        ]
        await first.wait()
        while core.stats()["running"] < 2:
            await asyncio.sleep(0.001)
        assert core.stats()["running"] == 2 and core.stats()["waiting"] == 1
        for i in range(3):
            engine.abort(f"a{i}")
        await asyncio.gather(*tasks)
        assert core.stats()["running"] == 0 and core.stats()["waiting"] == 0
        assert {n for n, _ in seen} == {"ttft", "itl"}

    run_async(core, main)


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("model", ["plain", "bytes"])
def test_async_deltas_concatenate_to_decoded_text(models, model):
    fe = frontend(models[model], max_num_seqs=4, max_num_batched_tokens=32)
    rng = random.Random(10)
    reqs = [
        (random_prompt(rng, 12), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
        (random_prompt(rng, 35), SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True)),
        (random_prompt(rng, 4), SamplingParams(max_tokens=50, temperature=1.5, top_k=2000, seed=2, ignore_eos=True)),
        (random_prompt(rng, 2), SamplingParams(max_tokens=25, temperature=1.0, seed=3)),
        (random_prompt(rng, 50), SamplingParams(max_tokens=20, temperature=0.8, seed=4, ignore_eos=True)),
    ]

    async def main(engine):
        return await asyncio.gather(*(collect(engine, p, sp) for p, sp in reqs))

    texts = []
    for (_, sp), outs in zip(reqs, run_async(fe.core, main), strict=True):
        final = check_stream(outs)
        assert "".join(o.delta_text for o in outs) == final.text == fe.tokenizer.decode(final.token_ids)
        assert len(outs) == len(final.token_ids)  # one output per token
        if sp.ignore_eos:
            assert final.finish_reason == "length" and len(final.token_ids) == sp.max_tokens
        texts.append(final.text)
    if model == "bytes":  # the streams really held multi-byte characters, complete and broken
        assert any(c in t for t in texts for c in "中é😀")
        assert any("\ufffd" in t for t in texts)
