"""The `mixserve` command as a user runs it: tiny-model, generate, and serve (the README's main job)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from cluster.cli import main
from tests.helpers import listening_addresses, wait_until
from tests.serving.helpers import free_port

BIN = Path(sys.executable).parent


def test_tiny_model_is_a_transformers_checkpoint(tmp_path):
    from transformers import MixtralForCausalLM

    from cluster import LLM

    assert main(["tiny-model", str(tmp_path / "m"), "--layers", "2", "--hidden", "64", "--sliding-window", "8"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["num_local_experts"] == 8
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = [1, 22557, 1526, 28723] + list(range(100, 120))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (LLM(tmp_path / "m", progress=False).logits(ids) - ref).abs().max().item() < 1e-4
    assert main(["tiny-model", str(tmp_path / "mm"), "--hidden", "64", "--format", "mistral", "--shards", "2"]) == 0
    assert (tmp_path / "mm" / "params.json").is_file()
    assert len(list((tmp_path / "mm").glob("consolidated-*.safetensors"))) == 2


def test_tiny_model_rejects_bad_options(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--heads", "3", "--hidden", "64"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err


def test_generate_streams_text(tmp_path):
    main(["tiny-model", str(tmp_path / "m"), "--hidden", "64"])
    out = subprocess.run(
        [str(BIN / "mixserve"), "generate", "--model", str(tmp_path / "m"), "Hello", "--max-tokens", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "finish_reason=length" in out.stderr


@pytest.mark.ray
@pytest.mark.serving
@pytest.mark.slow
def test_serve_main_job_http_grpc_and_clean_stop(tmp_path):
    """`mixserve serve` with no model: the built-in tiny model over HTTP and gRPC on 2 workers; Ctrl-C stops it."""
    import grpc

    from cluster.serve.proto import mixserve_pb2 as pb
    from cluster.serve.proto import mixserve_pb2_grpc as pb_grpc

    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "MIXSERVE_CACHE": str(tmp_path / "cache")}
    env.pop("MIXSERVE_API_KEY", None)  # no key: the warning below must show
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "mixserve"), "serve", "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            return httpx.get(f"{base}/health", timeout=5).status_code == 200

        wait_until(healthy, "mixserve serve never became healthy", 180, 1, ignore=(httpx.HTTPError,))
        health = httpx.get(f"{base}/health").json()
        assert len(health["workers"]) == 2  # sharded over 2 expert workers by default
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            reply = pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="Hi", max_tokens=4, temperature=0))
        assert list(reply.token_ids) and reply.finish_reason == "length"
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(http_port) == listening_addresses(grpc_port) == {"127.0.0.1"}
        assert (tmp_path / "cache" / "tiny-default-v1" / "config.json").is_file()
        seen = ""
        while "Ctrl-C stops." not in seen:  # the URLs are printed once the deployment is up
            line = proc.stdout.readline()
            assert line, "mixserve serve exited early"
            seen += line
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
        output = seen + output
        assert proc.returncode == 0, output
        assert f"http://127.0.0.1:{http_port}/v1" in output and f"127.0.0.1:{grpc_port}" in output
        # closed by default: HTTP and gRPC on loopback only, so no key is no warning
        assert "mixserve serve: WARNING" not in output, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
