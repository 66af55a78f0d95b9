"""One Serve instance for the serving tests (real HTTP and gRPC servers on 127.0.0.1, free ports) and the main
application on it; tests that need an application of their own deploy it on the same instance."""

from __future__ import annotations

import json
import os
import socket
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster import LLM
from cluster.serve.app import GRPC_SERVICER, build_app
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from tests.conftest import ensure_local_ray
from tests.helpers import hf_mixtral

API_KEY = "test-key-123"
GRPC_AUTH = (("authorization", f"Bearer {API_KEY}"),)
MODEL_NAME = "mixtral-test"
ALIAS = "mixtral-alias"
CORS_ORIGIN = "https://app.example"
MAX_REQUEST_BYTES = 1024 * 1024
# Keys the ingress replica reads from its environment and from a file (as a Kubernetes Secret would give them).
ENV_KEYS_VAR = "MIXSERVE_TEST_API_KEYS"
ENV_KEYS = ("env-key-1", "env-key-2")
FILE_KEYS = ("file-key-1", "file-key-2")
# JSON schemas of the two functions the tool-call tests offer (HTTP and gRPC)
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_ARGS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
# Set while the test modules are collected, before Ray starts: Ray's processes (the ingress replica, the gRPC
# proxy) inherit this environment. The gRPC proxy's message limit is the application's request limit.
os.environ.setdefault(ENV_KEYS_VAR, " , ".join(ENV_KEYS))
os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_REQUEST_BYTES))


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


def metric(base: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on ``base``/metrics whose labels include ``labels``."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    assert found, f"{name} {labels or ''} not in /metrics"
    return total


def post(base: str, path: str, body=None, *, key: str | None = API_KEY, raw: bytes | str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:  # fmt: skip
    """POST ``body`` as JSON (or ``raw`` as is) with the API key ``key`` (None: no Authorization header)."""
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(f"{base}{path}", content=content, headers=h, timeout=timeout)


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
