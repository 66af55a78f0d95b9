"""The stored tensors of a module as the formats describe them (:class:`Part`): shapes and dtypes, checked on read.

Letters: N output features, K input features, G group size, Ng = K / G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.config.quantization import WeightScheme
from cluster.errors import CheckpointError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64, torch.int16, torch.int8)
SCALAR = ((), (1,), (1, 1))  # a per-tensor scale: stored as a 0-d tensor or with one element


@dataclass(frozen=True)
class Part:
    """One stored tensor of a module: its allowed shapes and dtypes; ``optional`` ones may be absent."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    optional: bool = False

    def check(self, t: torch.Tensor, *, where: str) -> None:
        if t.dtype not in self.dtypes:
            raise CheckpointError(f"{where} has dtype {t.dtype}; expected {' or '.join(map(str, self.dtypes))}")
        if tuple(t.shape) not in self.shapes:
            want = " or ".join(str(s) for s in self.shapes)
            raise CheckpointError(f"{where} has shape {tuple(t.shape)}, expected {want} for this config and scheme")


def dense_part(shape: tuple[int, ...]) -> dict[str, Part]:
    return {"weight": Part((shape,), FLOATS)}


def groups_of(scheme: WeightScheme, k: int, *, module: str) -> int:
    """Ng: scales per output feature (1 for channel and tensor schemes)."""
    if scheme.group_size is None:
        return 1
    if k % scheme.group_size:
        raise CheckpointError(
            f"{module}: {k} input features do not split into groups of {scheme.group_size} (the scheme's group_size)"
        )
    return k // scheme.group_size
