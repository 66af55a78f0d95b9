"""``mixserve serve``: start or join Ray, deploy the application with HTTP and gRPC, print the URLs, stop on Ctrl-C.

Closed by default: HTTP and gRPC bind ``--host`` (127.0.0.1 unless told otherwise). Ray Serve 2.60's gRPC proxy
takes no host (it binds ``[::]:<port>``); this command starts Ray with :mod:`cluster.serve.grpc_bind` as the job's
worker setup hook, so the proxy it starts binds ``--host`` too (joining a cluster whose Serve already runs keeps that
proxy as it is: a warning says so). ``--grpc-port 0`` turns gRPC off. Serving on a non-loopback address without an
API key prints a warning. The gRPC proxy's message size limit is set from ``--max-request-bytes`` when this command
starts Ray (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, read by the proxy process).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import ray
from ray import serve

from cluster.checkpoint.locate import resolve
from cluster.checkpoint.tiny_model import default_model_dir
from cluster.config.options import add_options, options_from
from cluster.config.serving import AppArgs, parse_args
from cluster.errors import MixserveError
from cluster.runtime.ray_start import start_local_ray
from cluster.serve import grpc_bind
from cluster.serve.app import GRPC_SERVICER, build_app, build_pool_app
from cluster.serve.ingress.auth import ApiKeys, keys_from_env

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ALL_INTERFACES = ("0.0.0.0", "::", "")
GRPC_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
POOL_APP = "mixserve-pool"  # the Serve application holding the expert pool that `mixserve serve` starts


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API and gRPC (default: built-in tiny model)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP and gRPC bind address (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (bound on --host); 0 turns gRPC off")
    p.add_argument("--address", default=None, help="Ray address to join (default: start a local Ray)")
    add_options(p, AppArgs, skip=("expert_placement",))
    p.set_defaults(func=serve_main)


def startup_warnings(host: str, grpc_port: int, api_keys: int, *, joining: bool = False) -> list[str]:
    """What an operator must know about who can reach this server."""
    out = []
    if grpc_port and joining:
        out.append(
            f"joining a Ray cluster: if Serve already runs there, its gRPC proxy keeps the address it was started "
            f"with (Ray's own: every interface), not {host}"
        )
    if not api_keys and host not in LOOPBACK:
        where = "every interface" if host in ALL_INTERFACES else host
        served = "HTTP and gRPC" if grpc_port else "HTTP"
        out.append(
            f"no API key: anyone who reaches {served} on {where} can generate. Set MIXSERVE_API_KEY, --api-key-file "
            "or --api-key."
        )
    return out


def ray_runtime_env(host: str) -> dict:
    """The job's runtime environment: Serve's gRPC proxy binds ``host`` (all interfaces: Ray's own binding)."""
    if host in ALL_INTERFACES:
        return {}
    return {"worker_process_setup_hook": grpc_bind.HOOK, "env_vars": {grpc_bind.GRPC_HOST_ENV: host}}


def _arguments(a: argparse.Namespace) -> dict:
    """The application's arguments from the flags (a model's folder name is its served name by default)."""
    args = options_from(a, AppArgs, skip=("expert_placement",))
    if "served_model_name" not in args and a.model:
        args["served_model_name"] = [Path(a.model).resolve().name]
    if a.address and a.api_key_env and os.environ.get(a.api_key_env):
        # The joined cluster's processes do not see this shell's environment: pass its keys along.
        args["api_key"] = [*args.get("api_key", []), *keys_from_env(os.environ[a.api_key_env])]
    return args


def _check(args: dict) -> tuple[AppArgs, ApiKeys]:
    """Everything that can be checked before Ray starts, so that it fails here with a clear message, not in a
    replica: the arguments, the API key file, and (given a model) its folder, config and dtype."""
    parsed = parse_args(args)
    keys = ApiKeys.from_args(parsed)
    if parsed.load.model:
        resolve(parsed.cluster_config())
    return parsed, keys


def _start_ray(a: argparse.Namespace, parsed: AppArgs) -> None:
    runtime_env = ray_runtime_env(a.host)
    if a.address:
        ray.init(address=a.address, runtime_env=runtime_env)
        return
    os.environ[GRPC_MESSAGE_SIZE_ENV] = str(parsed.serving.max_request_bytes)  # inherited by the gRPC proxy
    # room for every frontend replica the app may run (one is counted by start_local_ray), the ingress replicas
    # (0.5 CPU each), the pool's owner and Serve's controller and proxies, besides the workers
    serving = parsed.serving
    ingresses = serving.ingress_autoscaling.max_replicas if serving.ingress_autoscaling else serving.ingress_replicas
    frontends = (serving.max_frontends - 1) * parsed.parallel.frontend_cpus
    start_local_ray(parsed.parallel, extra_cpus=2.5 + 0.5 * ingresses + frontends, runtime_env=runtime_env)


def _print_urls(a: argparse.Namespace, parsed: AppArgs) -> None:
    host = "127.0.0.1" if a.host in ALL_INTERFACES else a.host
    print(f"mixserve is serving {', '.join(parsed.serving.served_model_name)}")
    print(f"  OpenAI HTTP API: http://{host}:{a.http_port}/v1   (health: /health, metrics: /metrics)")
    if a.grpc_port:
        print(f"  gRPC:            {host}:{a.grpc_port}   (service mixserve.v1.Generation)")
    else:
        print("  gRPC:            off (--grpc-port 0)")
    print("Ctrl-C stops.", flush=True)


def serve_main(a: argparse.Namespace) -> int:
    args = _arguments(a)
    try:
        parsed, keys = _check(args)
    except MixserveError as e:
        print(f"mixserve serve: {e}", file=sys.stderr)
        return 2
    if parsed.load.model is None:
        print(f"mixserve serve: no --model given; serving the built-in tiny model ({default_model_dir()})")
    for warning in startup_warnings(a.host, a.grpc_port, len(keys), joining=bool(a.address)):
        print(f"mixserve serve: WARNING: {warning}", file=sys.stderr)
    _start_ray(a, parsed)
    # Ctrl-C / SIGTERM from here on: finish the step in progress, then shut down cleanly.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    grpc_options = {"port": a.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER] if a.grpc_port else []}
    serve.start(http_options={"host": a.host, "port": a.http_port}, grpc_options=grpc_options)
    try:
        if parsed.parallel.expert_workers > 0 and parsed.parallel.expert_pool is None:
            # the pool in a Serve application of its own: a redeploy of "mixserve" keeps its workers loaded
            serve.run(build_pool_app(args), name=POOL_APP, route_prefix=None, blocking=False)
            args = {**args, "expert_pool": POOL_APP}
        serve.run(build_app(args), name="mixserve", route_prefix="/", blocking=False)
    except Exception as e:
        print(f"mixserve serve: deployment failed: {e}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        return 1
    _print_urls(a, parsed)
    stop.wait()
    print("stopping ...", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
