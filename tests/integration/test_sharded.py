"""Expert sharding on Ray: parity with W = 0 and transformers, placement, fault handling."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config.model import ModelConfig
from cluster.errors import ExpertWorkerError
from tests.helpers import hf_greedy, hf_logits, hf_mixtral, wait_until

pytestmark = pytest.mark.ray

PROMPTS = [[1, 415, 2936, 9060, 285, 1142], [1, 330, 1000, 2000, 77, 8, 9, 10, 11, 12, 13], [1, 5]]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def generate_once_back(llm: LLM, timeout_s: float = 60.0) -> list:
    """GREEDY over PROMPTS, retried while a restarting worker still fails it (at most ``timeout_s``)."""
    return wait_until(
        lambda: llm.generate(PROMPTS, GREEDY), "the cluster never served again", timeout_s, 0.5,
        ignore=(ExpertWorkerError,),
    )  # fmt: skip


def kill_while_generating(
    llm: LLM, pid: int, params: SamplingParams, prompts: list[list[int]] = PROMPTS, *, timeout_s: float = 30
) -> dict:
    """Start ``llm.generate(prompts, params)`` in a thread, SIGKILL process ``pid`` once the generation is decoding
    (checked, not slept for), and wait for the call to end (``timeout_s`` at most). Returns ``outcome`` (the
    outputs, or the exception raised), ``killed_at`` and ``ended_at`` (monotonic seconds)."""
    result: dict = {}
    before = llm.frontend_info()["engine"]["generation_tokens"]

    def call() -> None:
        try:
            result["outcome"] = llm.generate(prompts, params)
        except ExpertWorkerError as e:
            result["outcome"] = e
        result["ended_at"] = time.monotonic()

    t = threading.Thread(target=call)
    t.start()
    wait_until(
        lambda: llm.frontend_info()["engine"]["generation_tokens"] > before + 2 * len(prompts),
        "the generation never started decoding",
    )
    assert t.is_alive(), "the generation ended before the kill: make it longer"
    result["killed_at"] = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=timeout_s)
    assert not t.is_alive(), "the request hung after the kill"
    return result


def assert_actors_gone(names: list[str]) -> None:
    """No named actor of these names is left (an actor killed for good leaves the named-actor listing)."""
    import ray

    wait_until(
        lambda: not {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} & set(names),
        f"actors {names} are still there",
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    model = hf_mixtral(
        folder, seed=11, num_local_experts=8, num_experts_per_tok=2, sliding_window=12, max_position_embeddings=4096
    )
    return folder, model


@pytest.fixture(scope="module")
def reference(ckpt):
    folder, model = ckpt
    llm = LLM(folder, progress=False)
    ids = PROMPTS[1] + list(range(3000, 3020))
    ref = {
        "tokens": [o.token_ids for o in llm.generate(PROMPTS, GREEDY)],
        "logits": llm.logits(ids),
        "ids": ids,
    }
    # W = 0 itself agrees with transformers on this checkpoint.
    assert ref["tokens"][0] == hf_greedy(model, PROMPTS[0], 24)
    assert (ref["logits"] - hf_logits(model, ids)).abs().max().item() < 1e-4
    return ref


@pytest.mark.parametrize(
    ("workers", "transport", "overlap"),
    # overlap 2: decode steps of the 3 prompts run as two micro-batches in flight; 32: never at this batch size
    [(1, "object_ref", 2), (2, "object_ref", 32), (3, "object_ref", 2), (8, "object_ref", 32), (2, "gloo", 2)]
    + [(3, "gloo", 32)],
)
def test_sharded_matches_in_process(ray_instance, ckpt, reference, workers, transport, overlap):
    folder, model = ckpt
    with LLM(folder, expert_workers=workers, transport=transport, overlap_min_batch=overlap, progress=False) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        # a failed step ends its requests with finish_reason "error": show that error, not only shorter tokens
        assert [o.error for o in outs if o.finish_reason == "error"] == []
        tokens = [o.token_ids for o in outs]
        assert tokens == reference["tokens"]
        logits = llm.logits(reference["ids"])
        assert (logits - reference["logits"]).abs().max().item() < 1e-5
        # and transformers, directly
        assert tokens[1] == hf_greedy(model, PROMPTS[1], 24)

        # Memory: the frontend holds no expert weight; each worker exactly its share.
        cfg = ModelConfig.from_dir(folder)
        info = llm.frontend_info()
        assert info["expert_bytes"] == 0
        per_expert = cfg.expert_param_count() * 4
        placement = llm.placement()
        assert len(placement) == workers
        held = sorted(pair for p in placement for pair in map(tuple, p["experts"]))
        assert held == [(i, e) for i in range(cfg.num_layers) for e in range(cfg.num_experts)]
        for p in placement:
            assert p["expert_bytes"] == per_expert * len(p["experts"])
        # Routed-token counters: every token of every step reached top_k experts in every layer.
        load = llm.expert_load()
        assert len(load) == cfg.num_layers and all(len(row) == cfg.num_experts for row in load)
        assert len({sum(row) for row in load}) == 1 and sum(load[0]) > 0


def test_four_workers_get_four_distinct_gpus(ray_instance, ckpt):
    folder, _ = ckpt
    with LLM(folder, expert_workers=4, progress=False) as llm:
        placement = llm.placement()
        gpu_ids = [tuple(p["gpu_ids"]) for p in placement]
        assert all(len(g) == 1 for g in gpu_ids)
        assert len(set(gpu_ids)) == 4
        assert llm.frontend_info()["gpu_ids"] == []  # all four logical GPUs went to the workers
        # one Ray CPU each by default, so one torch thread each: 5 actors do not oversubscribe a small node
        assert llm.frontend_info()["threads"] == 1 and [p["threads"] for p in placement] == [1] * 4


def test_frontend_and_worker_cpus_set_their_torch_threads(ray_instance, ckpt, reference):
    folder, _ = ckpt
    with LLM(folder, expert_workers=2, gpus_per_worker=0, cpus_per_worker=2, frontend_cpus=3, progress=False) as llm:
        assert llm.frontend_info()["threads"] == 3
        assert [p["threads"] for p in llm.placement()] == [2, 2]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference["tokens"]


def test_explicit_placement_map(ray_instance, ckpt, reference):
    folder, _ = ckpt
    cfg = ModelConfig.from_dir(folder)
    mapping = [[(e + layer) % 2 for e in range(cfg.num_experts)] for layer in range(cfg.num_layers)]
    with LLM(folder, expert_workers=2, expert_placement=mapping, progress=False) as llm:
        placement = llm.placement()
        assert placement[0]["experts"] == [(0, 0), (0, 2), (0, 4), (0, 6), (1, 1), (1, 3), (1, 5), (1, 7)]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference["tokens"]


@pytest.mark.parametrize("transport", ["object_ref", "gloo"])
def test_killed_worker_fails_fast_then_recovers(ray_instance, ckpt, reference, transport):
    folder, _ = ckpt
    with LLM(folder, expert_workers=2, transport=transport, progress=False) as llm:
        victim = llm.placement()[1]["pid"]
        long = SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)
        result = kill_while_generating(llm, victim, long, [PROMPTS[0]])
        assert isinstance(result["outcome"], ExpertWorkerError), result
        # object refs name the worker; over RDT Ray also stops the frontend (both ends of the failed transfer)
        assert ("expert worker 1" if transport == "object_ref" else "expert worker") in str(result["outcome"])
        assert result["ended_at"] - result["killed_at"] < 15
        # Ray restarts the worker (over RDT the whole frontend and its workers are replaced); the next request
        # succeeds, same tokens as before.
        out = generate_once_back(llm)
        assert [o.token_ids for o in out] == reference["tokens"]
        after = llm.placement()
        assert after[1]["expert_bytes"] > 0 and after[1]["pid"] != victim


# -- the channel transport (Ray Compiled Graphs), with and without two micro-batches in flight ------------------
# One cluster per W, kept for the module: overlap is switched on the running frontend, and the fault test reuses
# the W = 2 cluster. A small token budget makes the 11-token prompt prefill in chunks; with overlap_min_batch 2
# every step with two or more chunks (decode, and prefill chunks next to decodes) runs as two micro-batches.
# CPU workers (no logical GPU): the three clusters live side by side.
CHUNKED = {"max_num_batched_tokens": 8, "max_num_seqs": 4}


GREEDY_LP = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def chunked_reference(ckpt):
    folder, _ = ckpt
    return LLM(folder, progress=False, **CHUNKED).generate(PROMPTS, GREEDY_LP)


@pytest.fixture(scope="module")
def channel_clusters(ckpt):
    folder, _ = ckpt
    started: dict[int, LLM] = {}

    def get(workers: int) -> LLM:
        if workers not in started:
            started[workers] = LLM(
                folder,
                expert_workers=workers,
                transport="channel",
                overlap_min_batch=2,
                gpus_per_worker=0,
                progress=False,
                **CHUNKED,
            )
        return started[workers]

    yield get
    for llm in started.values():
        llm.shutdown()


def set_overlap(llm: LLM, min_batch: int) -> None:
    llm.apply_model(lambda model: setattr(model.experts, "overlap_min_batch", min_batch))


def assert_same_logprobs(got, want, tol: float = 2e-5) -> None:
    """Same tokens, and every sampled row's log-probabilities (chosen and top 3) within ``tol``: logits within
    1e-5 move a log-softmax by at most 2e-5."""
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.logprobs, w.logprobs, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < tol
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top, strict=True)) < tol


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_channel_matches_in_process_with_and_without_overlap(
    ray_instance, ckpt, reference, chunked_reference, channel_clusters, workers
):
    _, model = ckpt
    llm = channel_clusters(workers)
    for overlap in (2, 0):
        set_overlap(llm, overlap)
        before = llm.frontend_info()["micro_batched_steps"]
        out = llm.generate(PROMPTS, GREEDY_LP)  # chunked prefill next to decodes, then decode batches of 3
        split = llm.frontend_info()["micro_batched_steps"] - before
        assert (split > 0) == (overlap > 0), (overlap, split)
        assert_same_logprobs(out, chunked_reference)
        assert [o.token_ids for o in out] == reference["tokens"]
        assert out[1].token_ids == hf_greedy(model, PROMPTS[1], 24)
        logits = llm.logits(reference["ids"])  # one sequence prefilled in chunks: never split
        assert (logits - reference["logits"]).abs().max().item() < 1e-5
    assert {p["threads"] for p in llm.placement()} == {1}  # torch threads from each worker's 1 Ray CPU


def test_channel_killed_worker_fails_fast_recovers_and_shuts_down_clean(ray_instance, reference, channel_clusters):
    llm = channel_clusters(2)
    set_overlap(llm, 2)
    placement = llm.placement()
    long = SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)
    result = kill_while_generating(llm, placement[1]["pid"], long)
    assert isinstance(result["outcome"], ExpertWorkerError), result
    assert "expert worker" in str(result["outcome"])
    assert result["ended_at"] - result["killed_at"] < 15
    # Ray restarts the worker; the graph is compiled again on the next step; same tokens as before.
    out = generate_once_back(llm)
    assert [o.token_ids for o in out] == reference["tokens"]
    # Shutdown tears the graph down and leaves no actor behind.
    names = [llm.frontend_info()["actor_name"], *(p["actor_name"] for p in llm.placement())]
    assert all(names) and len(set(names)) == 3
    llm.shutdown()
    assert_actors_gone(names)


def test_channel_worker_dying_while_the_graph_compiles_fails_that_call(ray_instance, ckpt, monkeypatch, caplog):
    """A worker SIGKILLed while the channel graph is being set up (as its nodes are bound, so Ray's compile meets
    a dead actor). At start (connect) it is logged and the frontend starts anyway; in a request it fails that call
    within seconds naming the worker; the next call compiles over the restarted worker and the experts give the
    in-process result. (A kill just after Ray's compile returns aborts the driver inside Ray 2.60 (a failed check
    in experimental_mutable_object_provider.cc), so that moment is covered by the test with stand-in workers
    below.)"""
    import router.channel as channel
    from cluster.checkpoint.locate import resolve
    from cluster.config.cluster import ClusterConfig
    from cluster.runtime.frontend import local_experts
    from cluster.runtime.pool import ExpertPool
    from cluster.runtime.resources import expert_placement
    from cluster.runtime.transports import expert_client
    from router.gate import Routing

    folder, _ = ckpt
    config = resolve(ClusterConfig.create(model=str(folder), expert_workers=2, transport="channel", gpus_per_worker=0))
    model_config = ModelConfig.from_dir(folder)
    pool = ExpertPool.launch(config, expert_placement(config.parallel, model_config))
    client = expert_client(config, pool.placement, pool.handles)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, model_config.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])  # [T, K]: every worker gets rows
    routing = Routing(ids=ids, weights=torch.softmax(torch.randn(6, 2, generator=g), dim=-1))
    real_node = channel.MultiOutputNode

    def kill_worker_1_as_the_graph_is_bound():
        # worker 1's current process (a restarted worker can answer ActorUnavailableError at first)
        victim = wait_until(
            lambda: ray_instance.get(pool.handles[1].status.remote(), timeout=60)["pid"],
            "worker 1 never answered",
            60,
            0.2,
            ignore=(ray_instance.exceptions.ActorUnavailableError,),
        )

        def kill_then_bind(nodes):
            os.kill(victim, signal.SIGKILL)
            return real_node(nodes)

        monkeypatch.setattr(channel, "MultiOutputNode", kill_then_bind)

    pattern = r"expert workers? \[?1\]? (died|failed) while the channel graph was being compiled"
    try:
        kill_worker_1_as_the_graph_is_bound()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="mixserve"):
            client.connect()  # the frontend starts anyway
        assert time.monotonic() - started < 15
        assert re.search(pattern, caplog.text) and "the first request compiles it" in caplog.text
        kill_worker_1_as_the_graph_is_bound()
        started = time.monotonic()
        with pytest.raises(ExpertWorkerError, match=pattern) as err:
            client.forward(1, x, routing)
        assert err.value.worker == 1
        assert time.monotonic() - started < 15
        monkeypatch.undo()
        local = local_experts(config, model_config, device="cpu", progress=False)
        torch.testing.assert_close(client.forward(1, x, routing), local.forward(1, x, routing), atol=1e-5, rtol=0)
    finally:
        client.close()
        pool.shutdown()


def test_channel_worker_replaced_while_the_graph_compiled_is_caught_by_a_second_look(ray_instance, monkeypatch):
    """Stand-in workers and graph: worker 1 answers with another pid after the compile than before it (it died and
    Ray restarted it meanwhile, which Ray's compile did not notice). The graph is not kept (it would wait on a gone
    process) but torn down, and the failure names worker 1."""
    from types import SimpleNamespace

    import router.channel as channel

    class Worker:
        def __init__(self, pids: list[int]) -> None:
            self.pids = iter(pids)
            self.run_packed = SimpleNamespace(bind=lambda arg: arg)
            self.status = SimpleNamespace(remote=lambda: ray_instance.put({"pid": next(self.pids)}))

    class Inputs:
        def __enter__(self):
            return [0, 1]

        def __exit__(self, *exc):
            return False

    torn: list[bool] = []
    compiled: list[bool] = []
    graph = SimpleNamespace(
        teardown=lambda: torn.append(True), execute=lambda *args: [ray_instance.put(None) for _ in args]
    )

    def compile_graph(**kw):
        compiled.append(True)
        return graph

    monkeypatch.setattr(channel, "InputNode", Inputs)
    monkeypatch.setattr(channel, "MultiOutputNode", lambda nodes: SimpleNamespace(experimental_compile=compile_graph))
    # worker 1: pid 20 before the first compile, 21 after it; 22 before and after the second
    transport = channel.ChannelTransport([Worker([10] * 4), Worker([20, 21, 22, 22])], timeout_s=5)
    x = torch.zeros(1, 4)
    with pytest.raises(ExpertWorkerError, match=r"expert workers \[1\] died while the channel graph") as err:
        transport.start(0, x, [])  # what a request's first layer does (connect() logs this instead)
    assert err.value.worker == 1 and compiled == [True]
    assert transport.start(0, x, []).wait() == []  # the failed graph was not kept: a new one is compiled
    assert compiled == [True, True]
    transport.close()  # waits for the background teardown of the first graph, then tears the second down
    assert torn == [True, True]


def test_with_two_copies_a_sigkilled_worker_fails_no_request(ray_instance, ckpt):
    """expert_replicas=2: SIGKILL of a worker mid-generation -> the layer goes to the other copy within the step,
    every sequence finishes with W = 0's tokens; Ray restarts the worker, health turns ok with its new pid."""
    folder, _ = ckpt
    long = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
    with LLM(folder, progress=False) as solo:
        expected = [o.token_ids for o in solo.generate(PROMPTS, long)]
    with LLM(folder, expert_workers=2, expert_replicas=2, progress=False) as llm:
        placement = llm.placement()
        every = [(layer, e) for layer in range(2) for e in range(8)]
        assert [sorted(p["experts"]) for p in placement] == [every, every]  # W = R = 2: both hold every expert
        before = llm.health()
        assert before["ok"] and [w["ok"] for w in before["workers"]] == [True, True]
        victim_pid = placement[1]["pid"]
        out = kill_while_generating(llm, victim_pid, long, timeout_s=120)["outcome"]
        assert not isinstance(out, Exception), out
        assert [o.token_ids for o in out] == expected
        assert [o.finish_reason for o in out] == ["length"] * 3
        info = llm.frontend_info()
        # one layer failed over, then worker 1 was left out (none if a late layer had already left it out: on a
        # contended box a reply can come past the lateness bound, and such hedges are failovers too)
        assert info["failovers"] >= 1 and info["failovers"] - info["hedges"] <= 1, info
        h = wait_until(
            lambda: (h := llm.health())["ok"] and all(w["ok"] for w in h["workers"]) and h,
            "health never turned ok again",
            60,
            0.5,
        )
        assert h["workers"][1]["pid"] != victim_pid and h["workers"][1]["load_seconds"] > 0
        assert h["missing_experts"] == []
        assert [o.token_ids for o in llm.generate(PROMPTS, long)] == expected
        assert llm.frontend_info()["workers_down"] == []  # routed to again once it answered a probe
