"""One Serve instance for the serving tests (real HTTP and gRPC servers on 127.0.0.1, free ports) and the main
application on it; tests that need an application of their own deploy it on the same instance."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from ray import serve

from cluster import LLM
from cluster.serve.app import GRPC_SERVICER, build_app
from tests.conftest import ensure_local_ray
from tests.helpers import hf_mixtral

API_KEY = "test-key-123"
MODEL_NAME = "mixtral-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    """Poll ``url`` (a /health) until it answers 200; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy within {timeout_s:g}s")


def metric(base: str, name: str) -> float:
    """The value of an unlabelled metric on ``base``/metrics."""
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition, message: str, timeout_s: float = 30, interval_s: float = 0.1) -> None:
    """Poll ``condition()`` until it is true; fail with ``message`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def serve_instance():
    """(http base URL, gRPC target) of Ray Serve on the shared local Ray instance."""
    ensure_local_ray()
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def served(serve_instance, tmp_path_factory):
    """(base_url, grpc_target, model_dir) of a running app: 2 expert workers, API key, 4096-token context."""
    folder = tmp_path_factory.mktemp("served")
    hf_mixtral(folder, seed=21, num_local_experts=8, max_position_embeddings=4096, sliding_window=64)
    base, grpc_target = serve_instance
    args = {
        "model": str(folder),
        "expert_workers": 2,
        "gpus_per_worker": 0,  # CPU actors: the logical GPUs stay free for the placement tests
        "api_key": API_KEY,
        "served_model_name": MODEL_NAME,
        "max_num_seqs": 8,
        "max_model_len": 4096,
        "request_timeout_s": 60,
    }
    serve.run(build_app(args), name="mixserve", route_prefix="/", blocking=False)
    wait_healthy(f"{base}/health")
    yield base, grpc_target, folder
    serve.delete("mixserve")


@pytest.fixture(scope="session")
def reference_llm(served):
    _, _, folder = served
    llm = LLM(folder, progress=False)
    yield llm
    llm.shutdown()
