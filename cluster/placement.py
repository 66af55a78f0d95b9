"""Expert placement: which worker holds each (layer, expert), and where workers run on the Ray cluster.

The plan itself (:class:`ExpertPlacement`) is pure data. The Ray side (placement groups) is imported lazily so the
plan can be used without Ray (W = 0, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.errors import PlacementError


@dataclass(frozen=True)
class ExpertPlacement:
    """``mapping[layer][expert] -> worker``.

    Default (:meth:`contiguous`): contiguous blocks, the same experts on a worker for every layer; when W does not
    divide E the first ``E % W`` workers take one more. Example: E=8, W=3 -> workers hold {0,1,2}, {3,4,5}, {6,7}.
    """

    num_workers: int
    mapping: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise PlacementError("an expert placement needs at least one worker")
        if not self.mapping or not self.mapping[0]:
            raise PlacementError("an expert placement needs at least one layer and one expert")
        width = len(self.mapping[0])
        for layer, row in enumerate(self.mapping):
            if len(row) != width:
                raise PlacementError(f"layer {layer} places {len(row)} experts; layer 0 places {width}")
            for e, w in enumerate(row):
                if not isinstance(w, int) or not 0 <= w < self.num_workers:
                    raise PlacementError(
                        f"layer {layer} expert {e} is placed on worker {w!r}; workers are 0..{self.num_workers - 1}"
                    )
        used = {w for row in self.mapping for w in row}
        idle = sorted(set(range(self.num_workers)) - used)
        if idle:
            raise PlacementError(f"worker {idle[0]} holds no expert; use fewer workers")

    @classmethod
    def contiguous(cls, *, num_layers: int, num_experts: int, num_workers: int) -> ExpertPlacement:
        if num_workers < 1:
            raise PlacementError("expert_workers must be at least 1 for a sharded placement")
        if num_workers > num_experts:
            raise PlacementError(f"{num_workers} expert workers for {num_experts} experts: at most one per expert")
        base, extra = divmod(num_experts, num_workers)
        row: list[int] = []
        for w in range(num_workers):
            row += [w] * (base + (1 if w < extra else 0))
        return cls(num_workers=num_workers, mapping=tuple(tuple(row) for _ in range(num_layers)))

    @classmethod
    def from_map(
        cls, mapping: Sequence[Sequence[int]], *, num_layers: int, num_experts: int, num_workers: int
    ) -> ExpertPlacement:
        """Validate an explicit ``[layer][expert] -> worker`` map (every expert placed exactly once)."""
        if len(mapping) != num_layers:
            raise PlacementError(f"placement map has {len(mapping)} layers; the model has {num_layers}")
        for layer, row in enumerate(mapping):
            if len(row) != num_experts:
                raise PlacementError(
                    f"placement map layer {layer} places {len(row)} experts; the model has {num_experts}"
                )
        return cls(num_workers=num_workers, mapping=tuple(tuple(int(w) for w in row) for row in mapping))

    @property
    def num_layers(self) -> int:
        return len(self.mapping)

    @property
    def num_experts(self) -> int:
        return len(self.mapping[0])

    def experts_of(self, worker: int) -> list[tuple[int, int]]:
        """Every (layer, expert) the worker holds."""
        return [(layer, e) for layer, row in enumerate(self.mapping) for e, w in enumerate(row) if w == worker]

    def worker_tensor(self, layer: int) -> torch.Tensor:
        """[E] int64: the worker of each expert of ``layer``."""
        return torch.tensor(self.mapping[layer], dtype=torch.int64)


@dataclass(frozen=True)
class WorkerResources:
    """What each actor asks Ray for."""

    gpus_per_worker: float
    frontend_gpus: float
    cpus_per_worker: float = 1.0


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
