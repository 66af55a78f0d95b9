"""One expert pool for two frontend replicas, redundant experts and killed processes, through the real Serve
application (HTTP on 127.0.0.1).

A second application on the shared Serve instance serves the main test model with two frontend replicas over ONE
pool of two expert workers that each hold a copy of every expert (``expert_replicas=2``): exactly two workers, both
frontends serving, 32 concurrent greedy requests equal to the in-process reference. SIGKILL of a worker process
under 16 streams (12 HTTP, 4 gRPC) spread over both frontends fails no request and changes no token. SIGKILL of a
frontend replica under load fails at most the requests it was running; the other frontend keeps serving, new
requests are served at once (one sent to the dead replica is sent again), the worker processes stay the same, and
Serve's replacement frontend attaches to them. The pool is a Serve application of its own, so a redeploy of the
application with a changed frontend-only option restarts the frontends and keeps the workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

import grpc
import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster import SamplingParams
from cluster.serve.app import build_app, build_pool_app
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc
from tests.helpers import wait_until
from tests.serving.helpers import API_KEY, finish_reason, metric, post, stream_choices, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.serving]

APP = "replicas"
POOL_APP = "replicas-pool"  # its expert pool, a Serve application of its own (kept through APP's redeploys)
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
        "frontend_replicas": 2,
        "gpus_per_worker": 0,
        "api_key": API_KEY,
        "served_model_name": "replicated",
        "max_num_seqs": STREAMS,
        "max_model_len": 4096,
        "request_timeout_s": 120,
    }
    serve.run(build_pool_app(args), name=POOL_APP, route_prefix=None, blocking=False)
    args = {**args, "expert_pool": POOL_APP}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"{serve_instance[0]}/{APP}"
    try:
        wait_healthy(f"{base}/health")
        yield base, args
    finally:
        serve.delete(APP)
        serve.delete(POOL_APP)


def prompts() -> list[list[int]]:
    return [[1, 330 + 7 * i, 1000 + i, 2000 + 3 * i] for i in range(STREAMS)]


def stream_text(base: str, prompt: list[int]) -> tuple[int, str, str | None]:
    """(status, text, finish_reason) of one streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    status, choices = stream_choices(base, body, headers={"authorization": f"Bearer {API_KEY}"})
    if isinstance(choices, str):
        return status, choices, None
    return status, "".join(c["text"] for c in choices), finish_reason(choices)


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


def frontend_requests(base: str) -> dict[str, float]:
    """Engine requests each frontend replica accepted (``engine`` label: the replica), from /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "mixserve:frontend_requests_total":
                out[sample.labels["engine"]] = sample.value
    return out


def _expert_workers() -> int:
    """Live expert workers of every application (named mixserve-expert-<pool>-<w>; a dead actor's name is gone)."""
    return sum(1 for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("mixserve-expert-"))


def _frontends() -> dict[str, int]:
    """Replica name -> pid of every live frontend replica of the application, asked of each replica's actor directly:
    through Serve's router the calls would all go to the less busy replica while the other streams."""
    prefix = f"SERVE_REPLICA::{APP}#Frontend#"
    out: dict[str, int] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            actor = ray.get_actor(a["name"], namespace=a["namespace"])
            with contextlib.suppress(Exception):  # one being stopped
                out[a["name"]] = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    return out


def _two_frontends() -> dict[str, int]:
    """:func:`_frontends` once exactly two answer (one may be starting or stopping)."""
    return wait_until(lambda: f if len(f := _frontends()) == 2 else None, "not two frontend replicas", 120, 0.2)


def _worker_pids(base: str) -> list[int]:
    return [w["pid"] for w in health(base)[1]["workers"]]


def _placement_groups() -> int:
    return sum(
        1
        for pg in ray.util.placement_group_table().values()
        if pg["name"].startswith("mixserve-") and pg["state"] == "CREATED"
    )


def complete(base: str, prompt: list[int]) -> str:
    r = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                       "ignore_eos": True}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def kill_while_streaming(base: str, run: Callable[[int], None], pid: int) -> None:
    """``run(i)`` for each of the STREAMS streams in threads; SIGKILL process ``pid`` once they decode (checked by
    the generated tokens in /metrics, not slept for); returns when every stream has ended (asserting none hung)."""
    tokens = metric(base, "mixserve:generation_tokens_total")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    wait_until(lambda: metric(base, "mixserve:generation_tokens_total") > tokens + 2 * STREAMS,
               "the streams never started decoding")  # fmt: skip
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung"


def test_two_frontends_share_one_pool_and_equal_the_reference(replicated, reference_llm):
    base, _ = replicated
    # both applications' workers: the main app's 2 and this app's 2 (one pool for its two frontends, not 4)
    assert _expert_workers() == 4 and _placement_groups() == 2
    assert len(set(_two_frontends().values())) == 2
    many = [[1, 500 + 11 * i, 40 + i, 900 + 2 * i] for i in range(32)]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in reference_llm.generate(many, greedy)]
    before = frontend_requests(base)
    texts: list = [None] * len(many)
    threads = [threading.Thread(target=lambda i=i: texts.__setitem__(i, complete(base, many[i]))) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert texts == expected
    after = frontend_requests(base)
    served = {e: n - before.get(e, 0) for e, n in after.items()}
    assert len([n for n in served.values() if n > 0]) == 2, served  # both frontends served
    assert sum(served.values()) == 32
    merge = [w["merge"] for w in health(base)[1]["workers"]]
    assert sum(m["messages"] for m in merge) >= sum(m["runs"] for m in merge) > 0


def test_sigkill_of_a_worker_under_16_streams_fails_no_request(replicated, serve_instance, reference_llm):
    (base, _), target = replicated, serve_instance[1]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in reference_llm.generate(prompts(), greedy)]
    wait_until(lambda: (s := health(base))[0] == 200 and s[1]["status"] == "ok", "not ok before the kill", 90, 0.3)
    _, h = health(base)
    victim = h["workers"][1]["pid"]
    failovers = metric(base, "mixserve:expert_failovers_total")
    before = frontend_requests(base)
    results: list = [None] * STREAMS

    def run(i: int) -> None:  # every fourth stream over gRPC
        results[i] = grpc_stream_text(target, prompts()[i]) if i % 4 == 3 else stream_text(base, prompts()[i])

    kill_while_streaming(base, run, victim)
    assert [r[0] for r in results] == [200] * STREAMS, [r for r in results if r[0] != 200]
    assert [r[2] for r in results] == ["length"] * STREAMS
    assert [r[1] for r in results] == expected
    served = {e: n - before.get(e, 0) for e, n in frontend_requests(base).items()}
    assert len([n for n in served.values() if n > 0]) == 2, served  # under load from both frontends
    assert metric(base, "mixserve:expert_failovers_total") >= failovers + 1
    # while worker 1 restarts its experts are still served by worker 0: 200 "degraded", nothing missing; then ok
    wait_until(lambda: (s := health(base))[0] == 200 and s[1]["status"] == "ok", "never ok again", 90, 0.3)
    status, h = health(base)
    assert h["workers"][1]["pid"] != victim and h["workers"][1]["load_seconds"] > 0
    assert metric(base, "mixserve:missing_experts") == 0


def test_sigkill_of_a_frontend_under_load_keeps_the_other_serving_and_the_workers(replicated, reference_llm):
    base, _ = replicated
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in reference_llm.generate(prompts(), greedy)]
    wait_until(lambda: health(base)[1].get("status") == "ok", "not ok before the kill", 90, 0.3)
    old_workers, frontends = _worker_pids(base), _two_frontends()
    victim = frontends[min(frontends)]
    results: list = [None] * STREAMS
    kill_while_streaming(base, lambda i: results.__setitem__(i, stream_text(base, prompts()[i])), victim)
    done = [i for i, r in enumerate(results) if r[0] == 200 and r[2] == "length"]
    assert done, results  # the other frontend kept serving
    assert all(results[i][1] == expected[i] for i in done)
    assert all(r[0] in (200, 500, 503) for r in results), results  # the killed one's requests fail cleanly
    # new requests are served at once: one routed to the dead replica before Serve noticed is sent again
    assert [complete(base, p) for p in prompts()[:4]] == expected[:4]
    assert _worker_pids(base) == old_workers  # the pool was not touched
    wait_until(lambda: len(f := _frontends()) == 2 and victim not in f.values(),
               "Serve did not start a new frontend replica", 120, 0.5)  # fmt: skip
    wait_healthy(f"{base}/health", timeout_s=120)
    assert _worker_pids(base) == old_workers  # the new frontend attached to the same workers
    assert (_expert_workers(), _placement_groups()) == (4, 2)
    assert [complete(base, p) for p in prompts()[:4]] == expected[:4]


def test_rolling_update_of_a_frontend_option_under_load_fails_no_request_and_keeps_the_workers(
    replicated, serve_instance, reference_llm
):
    """8 clients stream greedy completions back to back while the application is redeployed with another
    max_num_seqs (a declarative update of the same application, as `serve deploy` of an edited config does): every
    request of every client, before, during and after the update, finishes with the reference text; the frontends
    are replaced, the expert workers are not."""
    base, args = replicated
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = [o.text for o in reference_llm.generate(prompts(), greedy)]
    wait_until(lambda: health(base)[1].get("status") == "ok", "not ok before the update", 90, 0.3)
    workers, frontends = _worker_pids(base), _two_frontends()
    results: list[tuple[int, int, str, str | None]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            results.append((i, *stream_text(base, prompts()[i])))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 8, "no request finished before the update", 120, 0.05)
        serve.run(build_app({**args, "max_num_seqs": STREAMS + 8}), name=APP, route_prefix=f"/{APP}", blocking=False)
        wait_until(lambda: len(f := _frontends()) == 2 and not set(f.values()) & set(frontends.values()),
                   "the frontends were not updated", 180, 0.5)  # fmt: skip
        wait_healthy(f"{base}/health", timeout_s=120)
        after = len(results)
        wait_until(lambda: len(results) >= after + 8, "no request finished after the update", 120, 0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    bad = [r for r in results if r[1:] != (200, expected[r[0]], "length")]
    assert not bad, bad
    assert _worker_pids(base) == workers  # no worker restarted or reloaded
    assert (_expert_workers(), _placement_groups()) == (4, 2)


def test_a_frontend_that_does_not_match_the_pool_is_refused(replicated):
    """A second application asking the pool for other experts (expert_replicas 1 against the pool's 2) fails to
    start, naming the option; the pool and the first application serve on."""
    base, args = replicated
    from cluster.errors import SetupError
    from cluster.runtime.pool import AttachedPool
    from cluster.runtime.pool_owner import POOL_DEPLOYMENT

    handle = serve.get_deployment_handle(POOL_DEPLOYMENT, app_name=POOL_APP)
    with pytest.raises(SetupError, match="expert_replicas: the pool's is 2, this frontend's 1"):
        intruder = {"model": args["model"], "quantization": None, "dtype": "float32", "expert_workers": 2,
                    "expert_replicas": 1, "expert_placement": None}  # fmt: skip
        AttachedPool(handle, "intruder", intruder)
    assert health(base)[0] == 200
