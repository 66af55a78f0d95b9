"""What the serving tests share besides fixtures: the main application's keys and names, and small clients (free
ports, /health, /metrics, POST with a key)."""

from __future__ import annotations

import json
import os
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until

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
    wait_until(
        lambda: httpx.get(url, timeout=5).status_code == 200,
        f"{url} did not become healthy",
        timeout_s,
        0.5,
        ignore=(httpx.HTTPError,),
    )


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


def stream_choices(base: str, body: dict, *, headers: dict[str, str] | None = None) -> tuple[int, list[dict] | str]:
    """POST ``body`` (with ``stream: true``) to /v1/completions: (200, the first choice of every data event), or
    (the status, the error's text) for a refused request (its status) or an error event (500)."""
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=120) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        choices = []
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                return 500, json.dumps(chunk)
            choices.append(chunk["choices"][0])
    return 200, choices


def finish_reason(choices: list[dict]) -> str | None:
    """The last finish_reason a stream's choices gave."""
    return next((c["finish_reason"] for c in reversed(choices) if c.get("finish_reason")), None)
