"""``build_app(args)``: the Serve application for ``serve run`` / ``serve deploy`` (import_path
``cluster.serve.app:build_app``) and ``mixserve serve``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from cluster.errors import AppArgsError
from cluster.serve.args import AppArgs

GRPC_SERVICER = "cluster.serve.proto.mixserve_pb2_grpc.add_GenerationServicer_to_server"


def parse_args(args: dict[str, Any] | None) -> AppArgs:
    try:
        return AppArgs(**(args or {}))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in e.errors())
        raise AppArgsError(f"invalid mixserve application arguments: {problems}") from None


def _frontend_gpus(a: AppArgs) -> float:
    """The frontend gets a GPU when the workers use GPUs (or there are none) and the cluster has one to spare."""
    import ray

    if a.gpus_per_worker == 0:
        return 0.0
    total = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0.0
    if a.expert_workers == 0:
        return 1.0 if total >= 1 else 0.0
    per = a.gpus_per_worker if a.gpus_per_worker is not None else (1.0 if total >= a.expert_workers else 0.0)
    return 1.0 if per > 0 and total >= per * a.expert_workers + 1 else 0.0


def build_app(args: dict[str, Any] | None = None):
    """The application: an ingress (HTTP + gRPC) bound to one frontend deployment that owns its expert workers."""
    from ray import serve

    from cluster.serve.frontend_server import FrontendServer
    from cluster.serve.ingress import Ingress

    a = parse_args(args)
    plain = a.model_dump()
    queue = a.max_num_seqs + a.max_queued_requests
    frontend = serve.deployment(
        FrontendServer,
        name="Frontend",
        num_replicas=1,
        max_ongoing_requests=queue + 64,
        ray_actor_options={"num_cpus": 1, "num_gpus": _frontend_gpus(a)},
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
