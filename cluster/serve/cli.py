"""``mixserve serve``: start or join Ray, deploy the application with HTTP and gRPC, print the URLs, stop on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import ray
from ray import serve

from cluster.config import ModelConfig
from cluster.errors import MixserveError
from cluster.options import add_options, options_from
from cluster.serve.app import GRPC_SERVICER, build_app
from cluster.serve.args import AppArgs, parse_args
from cluster.tiny_model import default_model_dir


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API and gRPC (default: built-in tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--address", default=None, help="Ray address to join (default: start a local Ray)")
    add_options(p, AppArgs, skip=("expert_placement",))
    # Defaults that depend on the environment or on other flags (resolved in serve_main).
    p.set_defaults(api_key=os.environ.get("MIXSERVE_API_KEY"), served_model_name=None, func=serve_main)


def serve_main(a: argparse.Namespace) -> int:
    args = options_from(a, AppArgs, skip=("expert_placement",))
    if a.served_model_name is None:
        args.pop("served_model_name")
        if a.model:
            args["served_model_name"] = Path(a.model).resolve().name
    try:
        parsed = parse_args(args)
        if parsed.model:
            ModelConfig.from_dir(parsed.model)  # fail here, with a clear message, not inside a replica
    except MixserveError as e:
        print(f"mixserve serve: {e}", file=sys.stderr)
        return 2
    if parsed.model is None:
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
