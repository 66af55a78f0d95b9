"""Expert placement: which worker holds each (layer, expert), with copies of experts, as pure data (no Ray).

The runtime (``cluster.runtime.pool``) starts worker w with ``experts_of(w)``; the client routes each expert's rows
to a worker of ``holders(layer, expert)``; :func:`interleave_nodes` orders workers over nodes so copies land apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.errors import PlacementError


@dataclass(frozen=True)
class ExpertPlacement:
    """``mapping[layer][expert] -> worker`` (the expert's primary worker), and ``replicas`` copies of every expert.

    Default (:meth:`contiguous`): contiguous blocks, the same experts on a worker for every layer; when W does not
    divide E the first ``E % W`` workers take one more. Example: E=8, W=3 -> workers hold {0,1,2}, {3,4,5}, {6,7}.

    Replicas: copy r (0 = the primary) of an expert whose primary is worker p lives on worker ``(p + r) % W``, so the
    R copies are on R distinct workers. Example: E=4, W=2, R=2 -> both workers hold every expert; E=8, W=4, R=2 ->
    worker 1 holds {2,3} (its own) and {0,1} (worker 0's copies). The cluster orders workers so that neighbours
    sit on different nodes when it can (:func:`interleave_nodes`).
    """

    num_workers: int
    mapping: tuple[tuple[int, ...], ...]
    replicas: int = 1

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
        if not isinstance(self.replicas, int) or not 1 <= self.replicas <= self.num_workers:
            raise PlacementError(
                f"expert_replicas={self.replicas!r} needs 1 <= replicas <= expert workers ({self.num_workers}): "
                "the copies of an expert live on distinct workers"
            )
        used = {w for row in self.mapping for w in row}
        idle = sorted(set(range(self.num_workers)) - used)
        if idle:
            raise PlacementError(f"worker {idle[0]} holds no expert; use fewer workers")

    @classmethod
    def contiguous(cls, *, num_layers: int, num_experts: int, num_workers: int, replicas: int = 1) -> ExpertPlacement:
        if num_workers < 1:
            raise PlacementError("expert_workers must be at least 1 for a sharded placement")
        if num_workers > num_experts:
            raise PlacementError(f"{num_workers} expert workers for {num_experts} experts: at most one per expert")
        base, extra = divmod(num_experts, num_workers)
        row: list[int] = []
        for w in range(num_workers):
            row += [w] * (base + (1 if w < extra else 0))
        return cls(num_workers=num_workers, mapping=tuple(tuple(row) for _ in range(num_layers)), replicas=replicas)

    @classmethod
    def from_map(
        cls,
        mapping: Sequence[Sequence[int]],
        *,
        num_layers: int,
        num_experts: int,
        num_workers: int,
        replicas: int = 1,
    ) -> ExpertPlacement:
        """Validate an explicit ``[layer][expert] -> primary worker`` map (every expert placed exactly once; its
        other copies follow the rule in the class docstring)."""
        if len(mapping) != num_layers:
            raise PlacementError(f"placement map has {len(mapping)} layers; the model has {num_layers}")
        for layer, row in enumerate(mapping):
            if len(row) != num_experts:
                raise PlacementError(
                    f"placement map layer {layer} places {len(row)} experts; the model has {num_experts}"
                )
        return cls(
            num_workers=num_workers,
            mapping=tuple(tuple(int(w) for w in row) for row in mapping),
            replicas=replicas,
        )

    @property
    def num_layers(self) -> int:
        return len(self.mapping)

    @property
    def num_experts(self) -> int:
        return len(self.mapping[0])

    def holders(self, layer: int, expert: int) -> tuple[int, ...]:
        """The workers holding a copy of ``expert`` of ``layer``, primary first."""
        p = self.mapping[layer][expert]
        return tuple((p + r) % self.num_workers for r in range(self.replicas))

    def experts_of(self, worker: int) -> list[tuple[int, int]]:
        """Every (layer, expert) the worker holds a copy of."""
        return [
            (layer, e)
            for layer in range(self.num_layers)
            for e in range(self.num_experts)
            if worker in self.holders(layer, e)
        ]

    def missing(self, live: set[int]) -> list[tuple[int, int]]:
        """Every (layer, expert) with no copy on a worker in ``live``."""
        return [
            (layer, e)
            for layer in range(self.num_layers)
            for e in range(self.num_experts)
            if not live.intersection(self.holders(layer, e))
        ]

    def worker_tensor(self, layer: int) -> torch.Tensor:
        """[E] int64: the primary worker of each expert of ``layer``."""
        return torch.tensor(self.mapping[layer], dtype=torch.int64)


def interleave_nodes(nodes: Sequence[str]) -> list[int]:
    """Bundle order for workers 0..W-1 given the node of each bundle: round-robin over nodes, so that workers w and
    w + 1 (an expert's copies) sit on different nodes whenever the bundles allow.

    Example: nodes ["a", "a", "b", "b"] -> [0, 2, 1, 3] (workers on a, b, a, b).
    """
    by_node: dict[str, list[int]] = {}
    for bundle, node in enumerate(nodes):
        by_node.setdefault(node, []).append(bundle)
    queues = sorted(by_node.values(), key=lambda q: (-len(q), q[0]))
    order: list[int] = []
    while len(order) < len(nodes):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order
