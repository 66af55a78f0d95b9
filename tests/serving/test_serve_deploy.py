"""`serve deploy deploy/serve_config.yaml` against a `ray start --head` cluster, a real request, a rolling update of a
frontend-only setting through `serve deploy` under load, `serve shutdown`.

The cluster is a separate one (its own ports and temp dir, started with --block so stopping that one process
stops it), so the shared test instance keeps running. The test process is no driver of that cluster: it talks to it
only through the `serve` CLI and HTTP.

The rolling update (issue 20): 4 clients stream greedy completions back to back (the generated token ids come back
through ``logprobs`` with ``return_tokens_as_token_ids``) while the `mixserve` application's max_num_seqs is changed
in the config file and `serve deploy` runs again. GET /health then names a frontend replica that was not there
before; every request before, during and after the update finished with finish_reason "length" and the token ids
of transformers' MixtralForCausalLM greedy generate in float32 on the same built-in tiny checkpoint; once
`serve status` shows both applications RUNNING with only running replicas, the expert workers' pids in /health are
the ones from before (no worker restarted, no expert reloaded).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import LOGITS_TOL, wait_until
from tests.serving.helpers import finish_reason, free_port, stream_choices, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.serving, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MAX_TOKENS = 32
CLIENTS = 4
# Prompts whose greedy paths are clear choices on the tiny model: at every step the reference's best logit leads the
# second by MARGIN, ten times the float32 agreement of two implementations, so no rounding can flip a token.
PROMPTS = [[1, 330 + 7 * i, 1000 + i, 2000 + 3 * i] for i in (6, 8, 14, 17)]
MARGIN = 10 * LOGITS_TOL["float32"]
Result = tuple[int, int, list[int] | str, str | None]  # (prompt index, status, token ids or error, finish reason)


def _serve(env: dict[str, str], *args: str) -> str:
    """Run the `serve` CLI; its stdout (asserting it succeeded)."""
    out = subprocess.run([str(BIN / "serve"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"serve {' '.join(args)}: {out.stderr[-2000:]}"
    return out.stdout


def _start_head(env: dict[str, str], gcs_port: int, dash_port: int, ray_tmp: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            f"--dashboard-port={dash_port}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=8",
            "--include-dashboard=true",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop_head(head: subprocess.Popen, ray_tmp: str) -> None:
    """SIGTERM to the whole group (ray start --block, GCS, raylet, workers); SIGKILL what lingers."""
    os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=10)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _reference() -> list[list[int]]:
    """Greedy token ids of PROMPTS (MAX_TOKENS each, eos ignored) by transformers on the built-in tiny checkpoint
    (the folder ``$MIXSERVE_CACHE`` names, as the replicas load it) in float32; each step a clear choice."""
    from transformers import MixtralForCausalLM

    from cluster.checkpoint.tiny_model import default_model_dir

    model: Any = MixtralForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    greedy = {"max_new_tokens": MAX_TOKENS, "min_new_tokens": MAX_TOKENS, "do_sample": False, "pad_token_id": 0}
    out = []
    for prompt in PROMPTS:
        x = torch.tensor([prompt])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = model.generate(x, attention_mask=torch.ones_like(x), **greedy)[0, len(prompt) :].tolist()
            top2 = model(torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1 :].topk(2, dim=-1)
        assert top2.indices[:, 0].tolist() == ids
        assert float((top2.values[:, 0] - top2.values[:, 1]).min()) >= MARGIN, f"a near-tie after {prompt}"
        out.append(ids)
    return out


def _stream_ids(base: str, prompt: list[int]) -> tuple[int, list[int] | str, str | None]:
    """(status, generated token ids, finish_reason) of one streamed greedy completion; on an error (status != 200,
    an error event, a broken connection: 599) the error's text instead of the ids."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}  # fmt: skip
    try:
        status, choices = stream_choices(base, body)
    except httpx.HTTPError as e:
        return 599, repr(e), None
    if isinstance(choices, str):
        return status, choices, None
    ids = [int(t.removeprefix("token_id:")) for c in choices for t in (c.get("logprobs") or {}).get("tokens", [])]
    return status, ids, finish_reason(choices)


def _health(base: str) -> dict:
    """GET /health's body, with its HTTP status as ``code``."""
    r = httpx.get(f"{base}/health", timeout=10)
    return {**r.json(), "code": r.status_code}


def _frontends(base: str) -> set[str]:
    """The frontend replicas the ingress knows of: /health's (the last part of its replica id) and the ``engine``
    labels of ``mixserve:frontend_requests_total`` in /metrics."""
    names = {str(_health(base)["frontend"]).rsplit("#", 1)[-1]}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        names |= {s.labels["engine"] for s in family.samples if s.name == "mixserve:frontend_requests_total"}
    return names


def _replaced(base: str, old: set[str]) -> bool:
    """/health is 200 "ok", answered by a frontend replica not in ``old``."""
    h = _health(base)
    return h["code"] == 200 and h["status"] == "ok" and str(h.get("frontend")).rsplit("#", 1)[-1] not in old


def _settled(env: dict[str, str], address: str) -> dict:
    """`serve status`'s applications once every one is RUNNING with only RUNNING replicas (else {})."""
    apps = yaml.safe_load(_serve(env, "status", "--address", address))["applications"]
    for app in apps.values():
        states = [s for d in app["deployments"].values() for s in d["replica_states"]]
        if app["status"] != "RUNNING" or set(states) != {"RUNNING"}:
            return {}
    return apps


def _redeploy_under_load(base: str, redeploy: Callable[[], None], expected: list[list[int]]) -> list[Result]:
    """CLIENTS threads stream PROMPTS back to back; once a few requests finished, ``redeploy()``; wait until a new
    frontend answers /health and a few more requests finished; stop the clients (asserting none hung) and return
    every result, checked against ``expected``."""
    results: list[Result] = []
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            results.append((i, *_stream_ids(base, PROMPTS[i])))

    old = _frontends(base)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 2 * CLIENTS, "no request finished before the update", 120, 0.05)
        redeploy()  # the clients keep streaming through it: no pause before, during or after
        wait_until(lambda: _replaced(base, old), f"no new frontend answered /health (old: {old})", 180, 0.5,
                   ignore=(httpx.HTTPError, ValueError, KeyError))  # fmt: skip
        after = len(results)
        wait_until(lambda: len(results) >= after + 2 * CLIENTS, "no request finished after the update", 120, 0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    bad = [r for r in results if r[1:] != (200, expected[r[0]], "length")]
    assert not bad, bad
    return results


def _rolling_update(base: str, address: str, env: dict[str, str], cfg_file: Path, config: dict) -> None:
    """The `mixserve` application's max_num_seqs 16 -> 24 in the config file, `serve deploy` of it under load: no
    request fails or changes, the frontends are replaced, the workers are not."""
    expected = _reference()
    workers = [w["pid"] for w in _health(base)["workers"]]
    assert len(workers) == 2 and all(workers), workers
    main = next(a for a in config["applications"] if a["name"] == "mixserve")

    def redeploy() -> None:
        main["args"]["max_num_seqs"] += 8  # a frontend-only setting: the pool's args stay as they were
        cfg_file.write_text(yaml.safe_dump(config))
        _serve(env, "deploy", str(cfg_file), "--address", address)

    results = _redeploy_under_load(base, redeploy, expected)
    assert {r[0] for r in results} == set(range(CLIENTS))
    wait_until(lambda: _settled(env, address), "the update did not settle in serve status", 120, 2)
    assert [w["pid"] for w in _health(base)["workers"]] == workers  # no worker restarted, no expert reloaded


def _shutdown(env: dict[str, str], address: str, base: str) -> None:
    _serve(env, "shutdown", "-y", "--address", address)

    def gone() -> bool:  # the app and its proxy are gone
        try:
            httpx.get(f"{base}/health", timeout=2)
        except httpx.HTTPError:
            return True
        return False

    wait_until(gone, "serve shutdown left the app running", 60, 1)


def test_serve_deploy_then_request_then_rolling_update_under_load_then_shutdown(tmp_path, monkeypatch):
    http_port, grpc_port, gcs_port, dash_port = (free_port() for _ in range(4))
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    cfg_file = tmp_path / "serve_config.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("MIXSERVE_CACHE", str(tmp_path / "cache"))  # the replicas' built-in model, and the reference's
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # the CLI must present the cluster's token (Ray 2.60 turns token auth on)
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="msray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = _start_head(env, gcs_port, dash_port, ray_tmp)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        wait_until(
            lambda: httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401),
            "ray start --head did not come up",
            90,
            0.5,
            ignore=(httpx.HTTPError,),
        )
        _serve(env, "deploy", str(cfg_file), "--address", address)
        base = f"http://127.0.0.1:{http_port}"
        wait_healthy(f"{base}/health", 180)
        r = httpx.post(
            f"{base}/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0}, timeout=60
        )
        assert r.status_code == 200, r.text
        body = r.json()
        main = next(a for a in config["applications"] if a["name"] == "mixserve")  # beside its pool application
        assert body["model"] == main["args"]["served_model_name"]
        assert body["usage"]["completion_tokens"] == 5
        _rolling_update(base, address, env, cfg_file, config)
        _shutdown(env, address, base)
    finally:
        _stop_head(head, ray_tmp)
