"""A layer answered by a restarted expert worker (a new process) fails: the worker that served the step's earlier
layers died, so the step's requests must fail (503) instead of going on, whatever the timing of Ray's restart. A
step of new requests only takes restarted workers as they are (the model runner calls ``fresh_step``)."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.errors import ExpertWorkerError
from cluster.runtime.pool import ExpertPool
from cluster.runtime.resources import expert_placement
from cluster.runtime.transports import expert_client
from router.client import ExpertClient
from router.gate import Routing
from tests.helpers import ensure_local_ray, hf_mixtral, wait_until

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    ensure_local_ray()
    folder = tmp_path_factory.mktemp("fence")
    hf_mixtral(folder, seed=5, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
    config = resolve(ClusterConfig.create(model=str(folder), expert_workers=2, gpus_per_worker=0))
    pool = ExpertPool.launch(config, expert_placement(config.parallel, ModelConfig.from_dir(folder)))
    yield config, pool
    pool.shutdown()


def client_of(config: ClusterConfig, pool: ExpertPool) -> ExpertClient:
    return expert_client(config.with_options(worker_timeout_s=30), pool.placement, pool.handles)


def start_layer(client: ExpertClient):
    """Layer 0 for 2 tokens, both routed to experts 0 and 4 (worker 0 and worker 1)."""
    routing = Routing(ids=torch.tensor([[0, 4], [0, 4]]), weights=torch.full((2, 2), 0.5))
    return client.transport.start(0, torch.randn(2, 64), client.plan(0, routing))


def pid_of(handle) -> int:
    return ray.get(handle.status.remote(), timeout=5)["pid"]


def kill_and_wait_for_restart(handle) -> None:
    """Kill the worker (Ray restarts it) and wait until its new process answers."""
    pid = pid_of(handle)
    ray.kill(handle, no_restart=False)
    wait_until(lambda: pid_of(handle) != pid, "the worker did not come back", 60, 0.1, ignore=(Exception,))


def test_a_layer_sent_after_the_worker_restarted_fails(pool):
    """Killed between two layers, back before the next: that layer reaches a new process and must fail; the next
    step (new requests after the failed ones) runs on the new process."""
    config, p = pool
    client = client_of(config, p)
    start_layer(client).wait()  # the step's first layer: served by the first processes
    kill_and_wait_for_restart(p.handles[0])
    with pytest.raises(ExpertWorkerError, match="expert worker 0") as err:
        start_layer(client).wait()
    assert err.value.worker == 0
    assert len(start_layer(client).wait()) == 2


def test_a_retry_that_reaches_the_restarted_worker_fails(pool):
    """Killed before the layer is sent: Ray fails the call (ActorUnavailableError, after its 1-2 s grace period)
    and the transport retries it; when the worker is back by then (a fast restart, or Ray slow to report), the retry
    reaches the new process and must fail, within seconds."""
    config, p = pool
    client = client_of(config, p)
    start_layer(client).wait()
    pid = pid_of(p.handles[0])
    ray.kill(p.handles[0], no_restart=False)
    wait_until(lambda: not process_alive(pid), "the killed worker's process is still there", 30, 0.05)
    pending = start_layer(client)  # Ray fails it (the actor is restarting) or the new process refuses it
    ray.wait([r for r in pending.refs if not isinstance(r, Exception)], num_returns=2, timeout=30)
    wait_until(lambda: pid_of(p.handles[0]) != pid, "the worker did not come back", 60, 0.1, ignore=(Exception,))
    t0 = time.monotonic()
    with pytest.raises(ExpertWorkerError, match="expert worker 0"):
        pending.wait()
    assert time.monotonic() - t0 < 10


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_restarted_while_no_request_used_it_fails_none(pool):
    """The engine's first step of new requests (StepBatch.first_step -> fresh_step) takes the restarted process."""
    config, p = pool
    client = client_of(config, p)
    start_layer(client).wait()
    kill_and_wait_for_restart(p.handles[0])
    client.fresh_step()
    assert len(start_layer(client).wait()) == 2
