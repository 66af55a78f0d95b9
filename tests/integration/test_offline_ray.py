"""The offline API on a laptop: ``LLM(model, expert_workers=2)`` with no Ray running starts its own local Ray, sized
for the frontend and its workers even when the machine has fewer cores than they ask for, and stops it at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model

pytestmark = pytest.mark.ray

SCRIPT = """
import json, sys
import ray
from cluster import LLM, SamplingParams
assert not ray.is_initialized()
with LLM(sys.argv[1], expert_workers=2, cpus_per_worker=2, progress=False) as llm:
    cpus = ray.cluster_resources()["CPU"]
    out = llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
print(json.dumps({"cpus": cpus, "tokens": out.token_ids, "ray_after": ray.is_initialized()}))
"""


def test_an_offline_llm_starts_and_stops_its_own_ray_sized_for_its_actors(tmp_path):
    folder = write_tiny_model(tmp_path, TinyModelSpec(hidden=32, intermediate=64, layers=1, experts=4))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the tests' shared instance
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # the frontend (1 CPU) + 2 workers x 2 CPUs + 1: more than this 2-core machine has
    assert got["cpus"] >= max(os.cpu_count() or 1, 6)
    assert got["ray_after"] is False  # the LLM started that Ray, so it stopped it
    with LLM(folder, progress=False) as local:  # the in-process reference
        want = local.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert got["tokens"] == want.token_ids
