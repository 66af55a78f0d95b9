"""Building the expert client for a config from the transport registry (``cluster.config.transports``), and the
actor class that can host it (with the transport's host hooks, when its row names any)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import Any

import torch

from cluster.config.cluster import ClusterConfig
from cluster.config.transports import spec_of
from cluster.runtime.resources import resolve_resources
from router.client import ExpertClient
from router.placement import ExpertPlacement
from router.transport import RemoteTransport

GPU_OVERLAP_MIN_BATCH = 256


def load_class(path: str) -> type:
    """The class a registry row names as ``"module:Class"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def overlap_min_batch(config: ClusterConfig, *, total_gpus: float) -> int:
    """``overlap_min_batch``, or when None: 256 tokens with GPU workers, else 0 (off).

    Each micro-batch reads every weight it touches once more, so the split pays only where a step is not bound by
    weight reads. Measured on the 2-core CPU box (bench model, decode batch 32 and 128, W = 1/2/4, object refs and
    channels): always slower with the split (the slowest worker's compute per step x1.5-2.3, the frontend's
    x0.9-2.3). With GPU workers the halves run on separate devices; 256 keeps each half at 128+ tokens (not
    measured: no GPU was lent)."""
    parallel = config.parallel
    if parallel.overlap_min_batch is not None:
        return parallel.overlap_min_batch
    per = resolve_resources(
        expert_workers=parallel.expert_workers, gpus_per_worker=parallel.gpus_per_worker, total_gpus=total_gpus
    ).gpus_per_worker
    return GPU_OVERLAP_MIN_BATCH if per > 0 and torch.cuda.is_available() else 0


def expert_client(
    config: ClusterConfig, placement: ExpertPlacement, handles: Sequence[Any], *, total_gpus: float = 0.0
) -> ExpertClient:
    """The client for ``config.parallel.transport`` over the workers ``handles``, to be driven by the process that
    calls this (a channel graph is compiled when the frontend is built, an RDT group on first use; an RDT client
    lives in an actor with the row's host hooks: :func:`host_class`). Call its ``close()`` before killing the
    workers."""
    parallel = config.parallel
    cls = load_class(spec_of(parallel.transport).client)
    assert issubclass(cls, RemoteTransport), f"{cls.__name__} is not a RemoteTransport"
    transport = cls(
        handles,
        timeout_s=parallel.worker_timeout_s,
        overlap_min_batch=overlap_min_batch(config, total_gpus=total_gpus),
    )
    transport.retry_unavailable = placement.replicas == 1
    return ExpertClient(placement, transport)


@functools.cache
def host_class(base: type, transport: str) -> type:
    """``base`` with the host hooks of ``transport``'s registry row mixed in (``base`` itself when it has none). The
    hooks find the transport through the host's ``expert_transport()``."""
    hooks = spec_of(transport).host_hooks
    if hooks is None:
        return base
    mixin = load_class(hooks)
    return type(f"{base.__name__}With{mixin.__name__}", (mixin, base), {})
