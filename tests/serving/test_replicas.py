"""Redundant experts and a killed frontend, through the real Serve application (HTTP on 127.0.0.1).

A second application on the shared Serve instance serves the main test model with two expert workers that each
hold a copy of every expert (``expert_replicas=2``). SIGKILL of a worker process under 16 streams (12 HTTP, 4 gRPC)
fails no request and changes no token; killing the frontend replica makes Serve start a new one, which replaces
its workers (the old ones die with their owner: no orphaned actors, no second placement group) and serves the same
tokens.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import httpx
import pytest
import ray
from ray import serve

from cluster import SamplingParams
from cluster.serve.app import build_app
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from tests.helpers import wait_until
from tests.serving.helpers import API_KEY, metric, post, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.serving]

APP = "replicas"
STREAMS = 16
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def replicated(serve_instance, served):
    """Base URL of the application with two copies of every expert (the main app's model and API key)."""
    _, _, folder = served
    args = {
        "model": str(folder),
        "expert_workers": 2,
        "expert_replicas": 2,
        "gpus_per_worker": 0,
        "api_key": API_KEY,
        "served_model_name": "replicated",
        "max_num_seqs": STREAMS,
        "max_model_len": 4096,
        "request_timeout_s": 120,
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"{serve_instance[0]}/{APP}"
    try:
        wait_healthy(f"{base}/health")
        yield base
    finally:
        serve.delete(APP)


def prompts() -> list[list[int]]:
    return [[1, 330 + 7 * i, 1000 + i, 2000 + 3 * i] for i in range(STREAMS)]


def stream_text(base: str, prompt: list[int]) -> tuple[int, str, str | None]:
    """(status, text, finish_reason) of one streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {API_KEY}"}
    text, reason = "", None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode(), None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                return 500, json.dumps(chunk), None
            choice = chunk["choices"][0]
            text += choice["text"]
            reason = choice.get("finish_reason") or reason
    return 200, text, reason


def grpc_stream_text(target: str, prompt: list[int]) -> tuple[int, str, str | None]:
    """(status, text, finish_reason) of one greedy GenerateStream: 200 when it finished, else the gRPC code's value."""
    request = pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    metadata = (("authorization", f"Bearer {API_KEY}"), ("application", APP))
    text, reason = "", None
    with grpc.insecure_channel(target) as channel:
        try:
            for reply in pb_grpc.GenerationStub(channel).GenerateStream(request, metadata=metadata, timeout=120):
                text += reply.text
                reason = reply.finish_reason or reason
        except grpc.RpcError as e:
            return e.code().value[0], e.details() or "", None
    return 200, text, reason


def health(base: str) -> tuple[int, dict]:
    r = httpx.get(f"{base}/health", timeout=30)
    return r.status_code, r.json()


def test_sigkill_of_a_worker_under_16_streams_fails_no_request(replicated, serve_instance, reference_llm):
    base, target = replicated, serve_instance[1]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in reference_llm.generate(prompts(), greedy)]
    status, h = health(base)
    assert status == 200 and h["status"] == "ok", h
    victim = h["workers"][1]["pid"]
    failovers = metric(base, "mixserve:expert_failovers_total")
    results: list = [None] * STREAMS

    def run(i: int) -> None:  # every fourth stream over gRPC
        results[i] = grpc_stream_text(target, prompts()[i]) if i % 4 == 3 else stream_text(base, prompts()[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    wait_until(lambda: metric(base, "mixserve:num_requests_running") >= STREAMS // 2, "the streams never started")
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert [r[0] for r in results] == [200] * STREAMS, [r for r in results if r[0] != 200]
    assert [r[2] for r in results] == ["length"] * STREAMS
    assert [r[1] for r in results] == expected
    assert metric(base, "mixserve:expert_failovers_total") >= failovers + 1
    # while worker 1 restarts its experts are still served by worker 0: 200 "degraded", nothing missing; then ok
    wait_until(lambda: (s := health(base))[0] == 200 and s[1]["status"] == "ok", "never ok again", 90, 0.3)
    status, h = health(base)
    assert h["workers"][1]["pid"] != victim and h["workers"][1]["load_seconds"] > 0
    assert metric(base, "mixserve:missing_experts") == 0


def _expert_workers() -> int:
    """Live expert workers of every application (named mixserve-expert-<replica>-<w>; a dead actor's name is gone)."""
    return sum(1 for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("mixserve-expert-"))


def _frontend_pid() -> int:
    """The pid of the frontend replica that answers (the app has one)."""
    return serve.get_deployment_handle("Frontend", app_name=APP).stats.remote().result(timeout_s=30)["pid"]


def _worker_pids(base: str) -> list[int]:
    return [w["pid"] for w in health(base)[1]["workers"]]


def _placement_groups() -> int:
    return sum(
        1
        for pg in ray.util.placement_group_table().values()
        if pg["name"].startswith("mixserve-") and pg["state"] == "CREATED"
    )


def test_killed_frontend_replica_comes_back_with_fresh_workers_and_no_orphans(replicated, reference_llm):
    base = replicated
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = reference_llm.generate([prompts()[0]], greedy)[0].text
    wait_until(lambda: health(base)[1].get("status") == "ok", "not ok before the kill", 90, 0.3)
    old_pids = _worker_pids(base)
    # both applications' workers and placement groups (the main app: 2 workers, 1 group)
    assert (_expert_workers(), _placement_groups()) == (4, 2)
    frontend = _frontend_pid()
    os.kill(frontend, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(
        lambda: _frontend_pid() != frontend, "Serve did not start a new frontend replica", 120, 0.5, ignore=(Exception,)
    )
    wait_healthy(f"{base}/health", timeout_s=120)
    recovered_s = time.monotonic() - killed_at
    new_pids = _worker_pids(base)
    assert not set(new_pids) & set(old_pids), (old_pids, new_pids)  # replaced, not re-attached
    counts = lambda: (_expert_workers(), _placement_groups())  # noqa: E731
    wait_until(lambda: counts() == (4, 2), f"orphaned workers or groups: {counts()}", 30, 0.5)
    for pid in old_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    r = post(base, "/v1/completions", {"prompt": prompts()[0], "max_tokens": MAX_TOKENS, "temperature": 0,
                                       "ignore_eos": True})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    assert recovered_s < 120
