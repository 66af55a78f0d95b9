"""A model step that fails for a reason other than a worker (a bug) reaches the client as HTTP 500 / gRPC INTERNAL
with the request id and no traceback, and the server keeps serving.

The application here is the real Ingress bound to a frontend whose engine executor raises on POISON_TOKEN
(tests/serving/faulty_frontend.py); it runs next to the main test application on the same Serve instance, with
its experts in the frontend process (no worker actors) so that it starts fast.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import grpc
import httpx
import pytest
from ray import serve

from cluster.serve.ingress.deployment import Ingress
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from tests.helpers import hf_mixtral
from tests.serving.faulty_frontend import POISON_TOKEN, FaultyFrontendServer
from tests.serving.helpers import wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.serving]

ROOT = Path(__file__).resolve().parents[2]
APP = "faulty"
METADATA = (("application", APP),)  # more than one application runs: gRPC names the one it calls
ENGINE_ID = re.compile(r"cmpl-[0-9a-f]{32}-0")


@pytest.fixture(scope="module")
def faulty(serve_instance, tmp_path_factory):
    """(base URL, gRPC channel) of the faulty application."""
    folder = tmp_path_factory.mktemp("faulty")
    hf_mixtral(folder, seed=3)
    args = {"model": str(folder), "expert_workers": 0, "served_model_name": "faulty", "max_num_seqs": 4}
    # The replica must import tests.serving.faulty_frontend: put the repository on its path (no working_dir upload).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    frontend = serve.deployment(
        FaultyFrontendServer,
        name="Frontend",
        ray_actor_options={"num_cpus": 1, "num_gpus": 0, "runtime_env": {"env_vars": {"PYTHONPATH": path}}},
    ).bind(args)
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0.5}).bind(frontend, args)
    serve.run(ingress, name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"{serve_instance[0]}/{APP}"
    channel = grpc.insecure_channel(serve_instance[1])
    try:
        wait_healthy(f"{base}/health")
        yield base, channel
    finally:
        channel.close()
        serve.delete(APP)


def _complete(base: str, prompt: list[int], **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def _assert_internal(message: str, text: str) -> None:
    assert ENGINE_ID.search(message), message  # the request id to look up in the server log
    assert "Traceback" not in text and "injected" not in text and "poison" not in text


def test_http_step_failure_is_500_with_request_id_then_next_request_succeeds(faulty):
    base, _ = faulty
    r = _complete(base, [1, POISON_TOKEN, 22])
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "internal_error" and err["code"] == 500 and err["param"] is None
    _assert_internal(err["message"], r.text)

    ok = _complete(base, [1, 22, 23])
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4


def test_http_stream_step_failure_ends_with_a_500_error_event(faulty):
    base, _ = faulty
    with httpx.stream(
        "POST",
        f"{base}/v1/completions",
        json={"prompt": [1, POISON_TOKEN], "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200  # the status line went out before the step failed
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert err["code"] == 500 and err["type"] == "internal_error"
    _assert_internal(err["message"], "\n".join(lines))
    assert _complete(base, [1, 24], stream=False).status_code == 200


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_grpc_step_failure_is_internal_then_next_request_succeeds(faulty, method):
    _, channel = faulty
    stub = pb_grpc.GenerationStub(channel)
    call = getattr(stub, method)
    request_id = f"poisoned-{method}"
    bad = pb.GenerateRequest(prompt_token_ids=[1, POISON_TOKEN], max_tokens=4, request_id=request_id)
    with pytest.raises(grpc.RpcError) as info:
        result = call(bad, metadata=METADATA, timeout=60)
        if method == "GenerateStream":
            list(result)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert request_id in details and "Traceback" not in details and "injected" not in details

    good = pb.GenerateRequest(prompt_token_ids=[1, 25], max_tokens=3, temperature=0)
    result = call(good, metadata=METADATA, timeout=60)
    replies = [result] if method == "Generate" else list(result)
    assert sum(len(r.token_ids) for r in replies) == 3
