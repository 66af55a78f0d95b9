"""One Serve instance for the serving tests (real HTTP and gRPC servers on 127.0.0.1, free ports) and the main
application on it; tests that need an application of their own deploy it on the same instance."""

from __future__ import annotations

import grpc
import pytest
from ray import serve

from cluster import LLM
from cluster.serve.app import GRPC_SERVICER, build_app
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from tests.helpers import ensure_local_ray, hf_mixtral
from tests.serving.helpers import (
    ALIAS,
    API_KEY,
    CORS_ORIGIN,
    ENV_KEYS_VAR,
    FILE_KEYS,
    MAX_REQUEST_BYTES,
    MODEL_NAME,
    free_port,
    wait_healthy,
)


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
    """(base_url, grpc_target, model_dir) of a running app: 2 expert workers, API keys (an arg, an environment
    variable, a file), a model alias, CORS for one origin, a 1 MiB request limit, 4096-token context."""
    folder = tmp_path_factory.mktemp("served")
    hf_mixtral(folder, seed=21, num_local_experts=8, max_position_embeddings=4096, sliding_window=64)
    key_file = folder / "api-keys"
    key_file.write_text("# one key per line\n" + "\n".join(FILE_KEYS) + "\n")
    base, grpc_target = serve_instance
    args = {
        "model": str(folder),
        "expert_workers": 2,
        "gpus_per_worker": 0,  # CPU actors: the logical GPUs stay free for the placement tests
        "api_key": API_KEY,
        "api_key_env": ENV_KEYS_VAR,
        "api_key_file": str(key_file),
        "served_model_name": [MODEL_NAME, ALIAS],
        "cors_allowed_origins": [CORS_ORIGIN],
        "max_request_bytes": MAX_REQUEST_BYTES,
        "max_num_seqs": 8,
        "max_model_len": 4096,
        "request_timeout_s": 60,
    }
    serve.run(build_app(args), name="mixserve", route_prefix="/", blocking=False)
    wait_healthy(f"{base}/health")
    yield base, grpc_target, folder
    serve.delete("mixserve")


@pytest.fixture(scope="session")
def stub(served):
    """A gRPC stub of the main application (send GRPC_AUTH as metadata)."""
    _, target, _ = served
    channel = grpc.insecure_channel(target)
    yield pb_grpc.GenerationStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def reference_llm(served):
    _, _, folder = served
    llm = LLM(folder, progress=False)
    yield llm
    llm.shutdown()
