"""One Serve application for the serving tests: real HTTP and gRPC servers on 127.0.0.1, free ports."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import ensure_local_ray
from tests.helpers import hf_mixtral

API_KEY = "test-key-123"
MODEL_NAME = "mixtral-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(base_url, grpc_target, model_dir) of a running app: 2 expert workers, API key, 4096-token context."""
    import httpx
    from ray import serve

    from cluster.serve.app import GRPC_SERVICER, build_app

    folder = tmp_path_factory.mktemp("served")
    hf_mixtral(folder, seed=21, num_local_experts=8, max_position_embeddings=4096, sliding_window=64)
    ensure_local_ray()
    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
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
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        serve.shutdown()
        raise RuntimeError("the Serve app did not become healthy")
    yield base, f"127.0.0.1:{grpc_port}", folder
    serve.shutdown()


@pytest.fixture(scope="session")
def reference_llm(served):
    from cluster import LLM

    _, _, folder = served
    llm = LLM(folder, progress=False)
    yield llm
    llm.shutdown()
