"""What each actor asks Ray for (GPUs and CPUs of the expert workers and of the frontend) and the expert placement
plan a config gives: pure arithmetic, no Ray."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config.model import ModelConfig
from cluster.config.parallel import ParallelConfig
from cluster.errors import PlacementError
from router.placement import ExpertPlacement


@dataclass(frozen=True)
class WorkerResources:
    """What each actor asks Ray for."""

    gpus_per_worker: float
    frontend_gpus: float
    cpus_per_worker: float = 1.0
    frontend_cpus: float = 1.0


def resolve_resources(*, expert_workers: int, gpus_per_worker: float | None, total_gpus: float) -> WorkerResources:
    """GPUs per worker and for the frontend, given the GPUs the Ray cluster has.

    Workers: ``gpus_per_worker`` as asked, or (None) 1 each when the cluster has a GPU for every worker, else 0.
    Frontend: none when the user asked for CPU workers (``gpus_per_worker=0``); with no workers (W = 0) one GPU
    when the cluster has any; otherwise one when a GPU is left over after the workers'.
    Example: 5 GPUs, W = 4 -> 1 GPU per worker and 1 for the frontend; 4 GPUs, W = 4 -> the frontend runs on CPU.
    """
    per = gpus_per_worker
    if per is None:
        per = 1.0 if expert_workers and total_gpus >= expert_workers else 0.0
    if per < 0:
        raise PlacementError("gpus_per_worker must be >= 0")
    if per * expert_workers > total_gpus:
        raise PlacementError(
            f"{expert_workers} expert workers x {per:g} GPUs need {per * expert_workers:g} GPUs; "
            f"the Ray cluster has {total_gpus:g}"
        )
    if gpus_per_worker == 0:
        frontend = 0.0
    elif expert_workers == 0:
        frontend = 1.0 if total_gpus >= 1 else 0.0
    else:
        frontend = 1.0 if per > 0 and total_gpus >= per * expert_workers + 1 else 0.0
    return WorkerResources(gpus_per_worker=per, frontend_gpus=frontend)


def expert_placement(parallel: ParallelConfig, model: ModelConfig) -> ExpertPlacement:
    """The plan of ``parallel.expert_workers`` workers for the model: ``expert_placement`` when given, else
    contiguous blocks; ``expert_replicas`` copies of every expert."""
    if parallel.expert_placement is None:
        return ExpertPlacement.contiguous(
            num_layers=model.num_layers,
            num_experts=model.num_experts,
            num_workers=parallel.expert_workers,
            replicas=parallel.expert_replicas,
        )
    return ExpertPlacement.from_map(
        parallel.expert_placement,
        num_layers=model.num_layers,
        num_experts=model.num_experts,
        num_workers=parallel.expert_workers,
        replicas=parallel.expert_replicas,
    )
