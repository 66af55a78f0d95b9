"""Issue 13's malformed and oversized inputs, sent as an attacker would: each is a 400 or 413 naming the field where
there is one, never a 500; /health keeps answering within a second while huge requests are processed; HTTP binds the
host it is given, and so does the gRPC proxy (cluster.serve.grpc_bind, set up by the shared Ray of the tests as
`mixserve serve` sets it up)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from cluster.serve.proto import mixserve_pb2 as pb
from tests.helpers import listening_addresses
from tests.serving.helpers import API_KEY, ENV_KEYS, FILE_KEYS, MAX_REQUEST_BYTES, post

pytestmark = [pytest.mark.ray, pytest.mark.serving]
CONTEXT = 4096
CHARS_PER_TOKEN = 32  # cluster.serve.ingress.body.MAX_CHARS_PER_TOKEN


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


MALFORMED = [
    ("nesting 100 deep", f'{{"prompt": {nested(100)}}}', 400, "prompt", "nested"),
    ("nesting 100000 deep", f'{{"prompt": {nested(100_000)}}}', 400, None, "nested"),
    ("int of 5000 digits", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", 400, "max_tokens", "out of range"),
    ("negative int of 5000 digits", '{"prompt": "x", "seed": -' + "9" * 5000 + "}", 400, "seed", "out of range"),
    ("float overflowing to inf", '{"prompt": "x", "temperature": 1e999}', 400, "temperature", "out of range"),
    ("NaN literal", '{"prompt": "x", "temperature": NaN}', 400, None, "NaN"),
    ("Infinity literal", '{"prompt": "x", "top_p": -Infinity}', 400, None, "Infinity"),
    ("lone surrogate in prompt", '{"prompt": "a\\ud800b"}', 400, "prompt", "Unicode"),
    ("lone low surrogate", '{"prompt": ["ok", "\\udfff"]}', 400, "prompt.1", "Unicode"),
    ("surrogate in stop", '{"prompt": "x", "stop": ["\\ud83d"]}', 400, "stop.0", "Unicode"),
    ("surrogate in a key", '{"prompt": "x", "\\ud800": 1}', 400, None, "Unicode"),
    ("raw UTF-8 surrogate bytes", b'{"prompt": "\xed\xa0\x80"}', 400, None, "UTF-8"),
    ("latin-1 body", b'{"prompt": "caf\xe9"}', 400, None, "UTF-8"),
    ("valid surrogate pair", '{"prompt": "\\ud83d\\ude00", "max_tokens": 1}', 200, None, ""),
    ("prompt too long to tokenize", {"prompt": "x" * (CONTEXT * CHARS_PER_TOKEN + 1)}, 400, "prompt", "characters"),
    ("chat too long to tokenize", {"messages": [{"role": "user", "content": "y" * (CONTEXT * CHARS_PER_TOKEN + 1)}]},
     400, "messages", "characters"),
    ("body over the limit", {"prompt": "z" * (MAX_REQUEST_BYTES + 10)}, 413, None, "bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "status", "param", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_are_400_or_413_naming_the_field(served, name, body, status, param, needle):
    base, _, _ = served
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kwargs = {"raw": body} if isinstance(body, (str, bytes)) else {"body": body}
    r = post(base, path, **kwargs)
    assert r.status_code == status, r.text[:500]
    if status == 200:
        return
    err = r.json()["error"]
    assert err["param"] == param, err
    assert needle.lower() in err["message"].lower(), err
    assert "Traceback" not in r.text


def test_body_limit_holds_without_content_length(served):
    """A chunked body (no Content-Length) is cut off once it passes the limit."""
    base, _, _ = served
    sent = {"bytes": 0}

    def chunks():
        yield b'{"prompt": "'
        for _ in range(4 * MAX_REQUEST_BYTES // 65536):
            sent["bytes"] += 65536
            yield b"a" * 65536
        yield b'"}'

    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    r = httpx.post(f"{base}/v1/completions", content=chunks(), headers=headers, timeout=60)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text[:300]


def test_health_answers_within_a_second_while_huge_requests_are_processed(served):
    base, _, _ = served
    # Prompts of just under the character bound (~30k tokens each): tokenized, answered with every id.
    prompt = "hello world " * (CONTEXT * CHARS_PER_TOKEN // 12)
    results: list[int] = []

    def huge() -> None:
        for _ in range(3):
            r = post(base, "/tokenize", {"prompt": prompt}, timeout=120)
            results.append(r.status_code if r.status_code != 200 or r.json()["count"] > CONTEXT else -1)
        results.append(post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 1}, timeout=120).status_code)

    threads = [threading.Thread(target=huge) for _ in range(6)]
    for t in threads:
        t.start()
    polls: list[float] = []
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=5) as c:
        while any(t.is_alive() for t in threads):
            assert time.monotonic() < deadline, "the huge requests never finished"
            t0 = time.monotonic()
            r = c.get(f"{base}/health")
            polls.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 18 + [400] * 6  # tokenized; beyond the context for a completion
    assert len(polls) >= 3, polls
    assert max(polls) < 1.0, f"/health took {max(polls):.2f}s while huge requests were processed"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_http_and_grpc_bind_the_given_host(served):
    base, target, _ = served
    http_port = int(base.rsplit(":", 1)[1])
    grpc_port = int(target.rsplit(":", 1)[1])
    assert listening_addresses(http_port) == {"127.0.0.1"}  # serve_instance started HTTP on 127.0.0.1
    # Ray Serve 2.60's proxy alone would bind [::]:<port>; the setup hook makes it bind the host
    assert listening_addresses(grpc_port) == {"127.0.0.1"}


def test_grpc_message_over_the_limit_is_refused(stub):
    big = pb.GenerateRequest(prompt="a" * (MAX_REQUEST_BYTES + 100), max_tokens=1)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(big, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("key", [ENV_KEYS[1], FILE_KEYS[0]])
def test_grpc_keys_from_the_environment_and_the_file(stub, key):
    r = stub.Tokenize(pb.TokenizeRequest(prompt="hi"), metadata=(("authorization", f"Bearer {key}"),), timeout=60)
    assert r.count == len(r.tokens) > 0
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(prompt="hi"), metadata=(("authorization", f"Bearer {key}-x"),), timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
