"""``mixserve serve``: start or join Ray, deploy the application with HTTP and gRPC, print the URLs, stop on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API and gRPC (default: built-in tiny model)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--expert-workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--placement-strategy", default="PACK")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-queued-requests", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--api-key", default=os.environ.get("MIXSERVE_API_KEY"), help="or MIXSERVE_API_KEY")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--address", default=None, help="Ray address to join (default: start a local Ray)")
    p.set_defaults(func=serve_main)


def serve_main(a: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.serve.app import GRPC_SERVICER, AppArgsError, build_app, parse_args

    args = {
        "model": str(a.model) if a.model else None,
        "expert_workers": a.expert_workers,
        "gpus_per_worker": a.gpus_per_worker,
        "placement_strategy": a.placement_strategy,
        "dtype": a.dtype,
        "max_num_seqs": a.max_num_seqs,
        "max_num_batched_tokens": a.max_num_batched_tokens,
        "max_queued_requests": a.max_queued_requests,
        "max_model_len": a.max_model_len,
        "api_key": a.api_key,
        "request_timeout_s": a.request_timeout_s,
    }
    if a.served_model_name:
        args["served_model_name"] = a.served_model_name
    elif a.model:
        args["served_model_name"] = a.model.resolve().name
    try:
        parsed = parse_args(args)
        if parsed.model:
            from cluster.config import ModelConfig

            ModelConfig.from_dir(parsed.model)  # fail here, with a clear message, not inside a replica
    except (AppArgsError, ValueError) as e:
        print(f"mixserve serve: {e}", file=sys.stderr)
        return 2
    if parsed.model is None:
        from cluster.tiny_model import default_model_dir

        print(f"mixserve serve: no --model given; serving the built-in tiny model ({default_model_dir()})")
    if a.address:
        ray.init(address=a.address)
    else:
        # Logical CPUs for the actors (ingress, frontend, W workers) even on a 2-core machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4 + a.expert_workers), include_dashboard=False)
    # Ctrl-C / SIGTERM from here on: finish the step in progress, then shut down cleanly.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(
        http_options={"host": a.host, "port": a.http_port},
        grpc_options={"port": a.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    try:
        serve.run(build_app(args), name="mixserve", route_prefix="/", blocking=False)
    except Exception as e:
        print(f"mixserve serve: deployment failed: {e}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        return 1
    host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    print(f"mixserve is serving {parsed.served_model_name}")
    print(f"  OpenAI HTTP API: http://{host}:{a.http_port}/v1   (health: /health, metrics: /metrics)")
    print(f"  gRPC:            {host}:{a.grpc_port}   (service mixserve.v1.Generation)")
    print("Ctrl-C stops.", flush=True)
    stop.wait()
    print("stopping ...", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
