"""``build_app(args)``: the Serve application for ``serve run`` / ``serve deploy`` (import_path
``cluster.serve.app:build_app``) and ``mixserve serve``."""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve import Application

from cluster.config.serving import AppArgs, parse_args
from cluster.errors import PlacementError
from cluster.runtime.resources import resolve_resources
from cluster.serve.frontend import FrontendServer
from cluster.serve.ingress.deployment import Ingress

__all__ = ["GRPC_SERVICER", "build_app", "parse_args"]

GRPC_SERVICER = "cluster.serve.proto.mixserve_pb2_grpc.add_GenerationServicer_to_server"


def _frontend_gpus(a: AppArgs) -> float:
    """The frontend deployment's GPUs. ``serve run`` builds the app before it starts Ray: then none, and the
    frontend replica checks the workers' GPUs against the cluster when it starts them."""
    if not ray.is_initialized():
        return 0.0
    total = float(ray.cluster_resources().get("GPU", 0))
    try:
        return resolve_resources(
            expert_workers=a.parallel.expert_workers, gpus_per_worker=a.parallel.gpus_per_worker, total_gpus=total
        ).frontend_gpus
    except PlacementError:
        return 0.0  # the frontend replica's pool reports what is missing when it starts its workers


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application: an ingress (HTTP + gRPC) bound to one frontend deployment that owns its expert workers."""
    a = parse_args(args)
    plain = a.options()  # flat and JSON-able: what Serve passes to each replica, parsed there again
    queue = a.engine.max_num_seqs + a.engine.max_queued_requests
    frontend = serve.deployment(
        FrontendServer,
        name="Frontend",
        num_replicas=1,
        max_ongoing_requests=queue + 64,
        ray_actor_options={"num_cpus": a.parallel.frontend_cpus, "num_gpus": _frontend_gpus(a)},
        health_check_timeout_s=60,
    ).bind(plain)
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=queue + 64,
        ray_actor_options={"num_cpus": 0.5},
    )
    return ingress.bind(frontend, plain)
