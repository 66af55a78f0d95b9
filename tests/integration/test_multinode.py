"""Placement across nodes and the loss of a node, on clusters simulated with ray.cluster_utils.Cluster."""

from __future__ import annotations

import time

import pytest

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from tests.helpers import wait_until

pytestmark = pytest.mark.ray


def test_spread_places_workers_on_both_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    folder = write_tiny_model(tmp_path / "m", TinyModelSpec(hidden=64, intermediate=128, layers=2, experts=4))
    if ray.is_initialized():
        ray.shutdown()  # the shared single-node instance comes back for the next test that needs it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    cluster.add_node(num_cpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        reference = LLM(folder, progress=False).generate(["hello"], SamplingParams(max_tokens=8, temperature=0))
        # the 3 workers' bundles over 2 nodes: SPREAD (best effort) puts them on both
        with LLM(folder, expert_workers=3, placement_strategy="SPREAD", progress=False) as llm:
            nodes = {p["node_id"] for p in llm.placement()}
            assert len(nodes) == 2, llm.placement()
            out = llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0))
            assert out[0].token_ids == reference[0].token_ids
        # two copies of every expert: workers w and w + 1 hold an expert's copies, so they go to different nodes
        # (the 2/1 split leaves one pair, the wrap-around from worker 2 to worker 0, on one node)
        with LLM(folder, expert_workers=3, expert_replicas=2, placement_strategy="SPREAD", progress=False) as llm:
            nodes = [p["node_id"] for p in llm.placement()]
            assert nodes[0] != nodes[1] and nodes[1] != nodes[2], nodes
            assert llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0))[0].token_ids == (
                reference[0].token_ids
            )
        with LLM(folder, expert_workers=2, placement_strategy="STRICT_PACK", progress=False) as llm:
            assert len({p["node_id"] for p in llm.placement()}) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_removed_node_worker_is_re_placed_where_there_is_room_else_health_names_missing_experts(tmp_path):
    """Four one-CPU nodes (plus a head with none) and SPREAD: the frontend and two workers take three nodes.
    Removing a worker's node re-places it on the spare node and requests resume with the same tokens; removing
    another worker's node leaves no room, so health names that worker's experts as missing until a node is added."""
    import ray
    from ray.cluster_utils import Cluster

    folder = write_tiny_model(tmp_path / "m", TinyModelSpec(hidden=64, intermediate=128, layers=2, experts=4))
    greedy = SamplingParams(max_tokens=8, temperature=0)
    if ray.is_initialized():
        ray.shutdown()
    small = {"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024 * 1024},
    )
    nodes = {n.node_id: n for n in (cluster.add_node(**small) for _ in range(4))}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        reference = LLM(folder, progress=False).generate(["hello"], greedy)[0].token_ids
        with LLM(folder, expert_workers=2, placement_strategy="SPREAD", progress=False) as llm:
            first = llm.placement()
            used = {p["node_id"] for p in first} | {llm.frontend_info()["node_id"]}
            assert len(used) == 3, first  # one bundle per node: one node is spare

            cluster.remove_node(nodes.pop(first[1]["node_id"]))
            moved = wait_until(
                lambda: (h := llm.health())["ok"] and all(w["ok"] for w in h["workers"]) and llm.placement(),
                "worker 1 was not re-placed on the spare node",
                90,
                0.5,
            )
            assert moved[1]["node_id"] not in used and moved[1]["pid"] != first[1]["pid"]
            assert llm.generate(["hello"], greedy)[0].token_ids == reference

            cluster.remove_node(nodes.pop(moved[0]["node_id"]))

            def unhealthy() -> dict | None:
                report = llm.health()
                return None if report["ok"] else report

            h = wait_until(unhealthy, "health never reported worker 0's experts as missing", 90, 0.5)
            assert [w["ok"] for w in h["workers"]] == [False, True]
            assert h["missing_experts"] == [[layer, e] for layer in range(2) for e in range(2)]  # worker 0's
            time.sleep(3)
            assert llm.health()["missing_experts"] == h["missing_experts"]  # no room: it stays missing
            t0 = time.monotonic()
            down = llm.placement(timeout_s=2)  # answers, naming the worker that does not
            assert time.monotonic() - t0 < 10 and "error" in down[0] and "error" not in down[1]
            assert down[0]["experts"] == [(layer, e) for layer in range(2) for e in range(2)]

            cluster.add_node(**small)
            wait_until(lambda: llm.health()["ok"], "worker 0 was not re-placed on the new node", 90, 0.5)
            assert llm.generate(["hello"], greedy)[0].token_ids == reference
    finally:
        ray.shutdown()
        cluster.shutdown()
