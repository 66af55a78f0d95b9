"""Placement across nodes with a simulated two-node cluster (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from cluster.tiny_model import TinyModelSpec, write_tiny_model

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
        # 3 workers + the frontend = 4 bundles over 2 nodes: SPREAD (best effort) splits them 2/2, so whichever
        # node takes the frontend also takes a worker. (With 2 workers, 3 bundles may leave both on one node.)
        with LLM(folder, expert_workers=3, placement_strategy="SPREAD", progress=False) as llm:
            nodes = {p["node_id"] for p in llm.placement()}
            assert len(nodes) == 2, llm.placement()
            out = llm.generate(["hello"], SamplingParams(max_tokens=8, temperature=0))
            assert out[0].token_ids == reference[0].token_ids
        with LLM(folder, expert_workers=2, placement_strategy="STRICT_PACK", progress=False) as llm:
            assert len({p["node_id"] for p in llm.placement()}) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()
