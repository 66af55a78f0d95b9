"""/health follows the expert workers: 503 while one is down, 200 once Ray has restarted it."""

from __future__ import annotations

import threading

import httpx
import pytest
import ray

from tests.helpers import wait_until
from tests.serving.helpers import API_KEY, metric

pytestmark = [pytest.mark.ray, pytest.mark.serving]


def _worker(w: int):
    """The main application's expert worker ``w`` (named mixserve-expert-<replica id>-<w>; the listing's order is
    not the workers' order)."""
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("mixserve-expert-")]
    assert len(names) == 2, names
    (mine,) = [a for a in names if a["name"].endswith(f"-{w}")]
    return ray.get_actor(mine["name"], namespace=mine["namespace"])


def test_health_turns_503_when_a_worker_dies_and_200_when_back(served):
    base, _, _ = served
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    victim = _worker(1)
    ray.kill(victim, no_restart=False)
    seen: list[int] = []

    def back_after_a_503() -> bool:
        r = httpx.get(f"{base}/health", timeout=30)
        seen.append(r.status_code)
        if r.status_code == 503:
            body = r.json()
            assert body["status"] in ("degraded", "unavailable")
            if body["status"] == "degraded":  # worker 1 holds experts 4-7 of every layer, with no other copy
                assert [w["ok"] for w in body["workers"]] == [True, False]
                assert {e for _, e in body["missing_experts"]} == {4, 5, 6, 7}
                assert len(body["missing_experts"]) % 4 == 0
        return 503 in seen and r.status_code == 200

    wait_until(back_after_a_503, "/health never reported the dead worker, then 200 again", 60)
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    # and the service works again
    r = httpx.post(
        f"{base}/v1/completions",
        json={"prompt": "back", "max_tokens": 4},
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_request_in_flight_when_a_worker_dies_gets_503_fast(served):
    base, _, _ = served
    victim = _worker(0)
    result: dict = {}

    def long_request():
        result["response"] = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": "long", "max_tokens": 3000, "ignore_eos": True, "temperature": 0},
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )

    t = threading.Thread(target=long_request)
    t.start()
    wait_until(lambda: metric(base, "mixserve:num_requests_running") == 1, "the long request never started")
    ray.kill(victim, no_restart=False)
    t.join(timeout=20)  # the bound: it fails within 20 s of its worker's death, it never hangs
    assert not t.is_alive(), "the request did not fail within 20 s of its worker's death"
    r = result["response"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    assert "expert worker" in r.json()["error"]["message"]
    # healthy again, so that later tests see a working app
    wait_until(lambda: httpx.get(f"{base}/health", timeout=30).status_code == 200, "never healthy again", 60, 0.2)
