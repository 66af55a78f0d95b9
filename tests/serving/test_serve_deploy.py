"""`serve deploy deploy/serve_config.yaml` against a `ray start --head` cluster, a real request, `serve shutdown`.

The cluster is a separate one (its own ports and temp dir, started with --block so stopping that one process
stops it), so the shared test instance keeps running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import wait_until
from tests.serving.helpers import free_port, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.serving, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_serve_deploy_then_request_then_shutdown(tmp_path):
    http_port, grpc_port, gcs_port, dash_port = (free_port() for _ in range(4))
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    cfg_file = tmp_path / "serve_config.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # the CLI must present the cluster's token (Ray 2.60 turns token auth on)
        "MIXSERVE_CACHE": str(tmp_path / "cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="msray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen(
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
    address = f"http://127.0.0.1:{dash_port}"
    try:
        wait_until(
            lambda: httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401),
            "ray start --head did not come up",
            90,
            0.5,
            ignore=(httpx.HTTPError,),
        )
        out = subprocess.run(
            [str(BIN / "serve"), "deploy", str(cfg_file), "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
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
        out = subprocess.run(
            [str(BIN / "serve"), "shutdown", "-y", "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]

        def gone() -> bool:  # the app and its proxy are gone
            try:
                httpx.get(f"{base}/health", timeout=2)
            except httpx.HTTPError:
                return True
            return False

        wait_until(gone, "serve shutdown left the app running", 60, 1)
    finally:
        # SIGTERM to the whole group (ray start --block, GCS, raylet, workers); SIGKILL what lingers.
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
