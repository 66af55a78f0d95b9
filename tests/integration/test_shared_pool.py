"""One expert pool for several offline frontends (``expert_pool=<name>``), batching across them in the workers, and
hedged dispatch around a worker that is alive but frozen (SIGSTOP), against the in-process (W = 0) reference."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray

from cluster import LLM, SamplingParams
from cluster.errors import SetupError
from tests.helpers import hf_mixtral, wait_until

pytestmark = pytest.mark.ray

PROMPTS = [[1, 415, 2936, 9060, 285, 1142], [1, 330, 1000, 2000, 77, 8, 9, 10, 11, 12, 13], [1, 5], [1, 99, 98]]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared-pool")
    hf_mixtral(folder, seed=41, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    return folder


@pytest.fixture(scope="module")
def reference(ckpt):
    with LLM(ckpt, expert_workers=0, dtype="float32", progress=False) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def expert_workers() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("mixserve-expert-"))  # fmt: skip


def test_a_second_llm_attaches_to_a_running_pool_by_name(ray_instance, ckpt, reference):
    options = dict(expert_workers=2, expert_replicas=2, dtype="float32", progress=False, expert_pool="pool-a")
    before = expert_workers()
    with LLM(ckpt, **options) as first:
        started = expert_workers()
        assert len(started) == len(before) + 2
        pids = [w["pid"] for w in first.placement()]
        with LLM(ckpt, **options) as second:
            assert expert_workers() == started  # attached: no worker started, none duplicated
            assert [w["pid"] for w in second.placement()] == pids
            outs: dict[str, list] = {}

            def run(name: str, llm: LLM) -> None:
                outs[name] = [o.token_ids for o in llm.generate(PROMPTS * 4, GREEDY)]

            threads = [threading.Thread(target=run, args=(n, x)) for n, x in (("first", first), ("second", second))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert outs["first"] == outs["second"] == reference * 4
            merge = [w["merge"] for w in second.health()["workers"]]
            assert sum(m["messages"] for m in merge) > sum(m["runs"] for m in merge) >= 1  # some runs merged
            assert sum(m["merged_runs"] for m in merge) >= 1
        # a frontend computing in another dtype is refused, naming it (auto resolves per device: pin it)
        with pytest.raises(SetupError, match=r"dtype: the pool's is 'float32', this frontend's 'bfloat16'"):
            LLM(ckpt, **{**options, "dtype": "bfloat16"})
        # the second LLM detached; the workers stay for the first
        assert expert_workers() == started
        assert [o.token_ids for o in first.generate(PROMPTS, GREEDY)] == reference
    wait_until(lambda: expert_workers() == before, "the pool's workers outlived the LLM that started it")


def test_the_pool_outlives_the_llm_that_started_it_while_another_is_attached(ray_instance, ckpt, reference):
    options = dict(expert_workers=2, dtype="float32", progress=False, expert_pool="pool-b")
    before = expert_workers()
    first = LLM(ckpt, **options)
    second = LLM(ckpt, **options)
    started = expert_workers()
    first.shutdown()  # the LLM that started the pool leaves; the other still uses its workers
    assert expert_workers() == started
    assert [o.token_ids for o in second.generate(PROMPTS, GREEDY)] == reference
    second.shutdown()  # the last one out stops the pool and its owner
    wait_until(lambda: expert_workers() == before, "the pool's workers outlived its last LLM")
    with pytest.raises(ValueError):
        ray.get_actor("pool-b", namespace="mixserve")


def test_a_frozen_worker_is_hedged_around_with_copies(ray_instance, ckpt, reference):
    """SIGSTOP one of two workers (each expert has a copy on the other) while a generation decodes: the layers it
    does not answer in time go to the other copy, the tokens are the reference's, and health shows it routed around
    while it is frozen; after SIGCONT it is taken back."""
    with LLM(ckpt, expert_workers=2, expert_replicas=2, dtype="float32", progress=False) as llm:
        prompts, params = PROMPTS * 2, SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)
        steady = [o.token_ids for o in llm.generate(prompts, params)]  # also measures the usual exchanges
        assert [t[:24] for t in steady[: len(PROMPTS)]] == reference
        pid = llm.placement()[1]["pid"]
        result: dict = {}
        before = llm.frontend_info()["engine"]["generation_tokens"]
        t = threading.Thread(target=lambda: result.update(outs=llm.generate(prompts, params)))
        t.start()
        wait_until(lambda: llm.frontend_info()["engine"]["generation_tokens"] > before + 4 * len(prompts),
                   "the generation never started decoding")  # fmt: skip
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: llm.frontend_info()["hedges"] >= 1, "no layer was hedged around the frozen worker", 20)
            worker = llm.health(timeout_s=1.0)["workers"][1]
            assert worker["ok"] is False and worker["routed_around"] is True
            t.join(timeout=60)
            assert not t.is_alive(), "the generation waited for the frozen worker"
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [o.token_ids for o in result["outs"]] == steady

        def taken_back() -> bool:  # the client readmits a worker when it plans a layer, so keep generating
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
            return llm.frontend_info()["workers_down"] == []

        wait_until(taken_back, "the worker was never taken back after it answered again", 30)
        assert llm.health()["workers"][1]["routed_around"] is False
