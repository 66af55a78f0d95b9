"""``build_app(args)``: the Serve application for ``serve run`` / ``serve deploy`` (import_path
``cluster.serve.app:build_app``) and ``mixserve serve``."""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve import Application

from cluster.config.serving import AppArgs, Autoscaling, parse_args
from cluster.errors import PlacementError
from cluster.runtime.pool_owner import POOL_DEPLOYMENT, PoolOwner, pool_options
from cluster.runtime.resources import resolve_resources
from cluster.serve.frontend import FrontendServer
from cluster.serve.ingress.deployment import Ingress

__all__ = ["GRPC_SERVICER", "build_app", "build_pool_app", "parse_args"]

GRPC_SERVICER = "cluster.serve.proto.mixserve_pb2_grpc.add_GenerationServicer_to_server"
PREFIX_ROUTER = "cluster.serve.routing:PrefixAffinityRouter"


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


def _scaling(replicas: int, autoscaling: Autoscaling | None) -> dict[str, Any]:
    """A deployment's ``num_replicas``, or its ``autoscaling_config`` when one is given."""
    if autoscaling is None:
        return {"num_replicas": replicas}
    return {"autoscaling_config": autoscaling.model_dump(exclude_none=True)}


def pool_deployment(a: AppArgs) -> Any:
    """The ``ExpertPool`` deployment (one replica, owning the workers), bound to the pool options of ``a``."""
    return serve.deployment(
        PoolOwner,
        name=POOL_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        health_check_timeout_s=60,
    ).bind(pool_options(a.cluster_config()), name=None)


def build_pool_app(args: dict[str, Any] | None = None) -> Application:
    """An application holding only an expert pool (the ``ExpertPool`` deployment; no HTTP route), made of the load and
    parallel options of ``args``. Applications whose ``expert_pool`` names it attach their frontends to it, so their
    own redeploys (any change of their args restarts all their deployments) leave its workers running."""
    a = parse_args(args)
    if a.parallel.expert_workers == 0:
        raise PlacementError("an expert pool application needs expert_workers >= 1")
    return pool_deployment(a)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application: an ingress (HTTP + gRPC) bound to the frontend deployment, whose replicas all attach to ONE
    expert pool, which owns the workers (none with expert_workers=0)::

        Ingress (ingress_replicas) -> Frontend (frontend_replicas / autoscaling) -> ExpertPool (1) -> W workers

    The pool is this application's own ``ExpertPool`` deployment, or, with ``expert_pool`` naming a Serve
    application built by :func:`build_pool_app`, that one's (found by the frontends when they start): Serve restarts
    every deployment of an application whose args change, so only a pool in an application of its own survives an
    update of frontend-only options (engine limits, KV cache, serving) with its workers loaded.
    """
    a = parse_args(args)
    plain = a.options()  # flat and JSON-able: what Serve passes to each replica, parsed there again
    queue = a.engine.max_num_seqs + a.engine.max_queued_requests
    own_pool = a.parallel.expert_workers > 0 and a.parallel.expert_pool is None
    serving = a.serving
    frontend = serve.deployment(
        FrontendServer,
        name="Frontend",
        max_ongoing_requests=queue + 64,
        ray_actor_options={"num_cpus": a.parallel.frontend_cpus, "num_gpus": _frontend_gpus(a)},
        health_check_timeout_s=60,
        # requests sharing a prefix meet on one frontend (its prefix cache) while it has room
        request_router_config={"request_router_class": PREFIX_ROUTER, "request_routing_stats_period_s": 1},
        **_scaling(serving.frontend_replicas, serving.frontend_autoscaling),
    ).bind(plain, pool_deployment(a) if own_pool else None)
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        max_ongoing_requests=queue + 64,
        ray_actor_options={"num_cpus": 0.5},
        **_scaling(serving.ingress_replicas, serving.ingress_autoscaling),
    )
    return ingress.bind(frontend, plain)
