"""One layer's quantized SwiGLU experts of a shard, each run on its own rows with the kernel that suits their
count (``workers.quant.linear``). No Ray here.

Letters: A (token, expert) assignments of a message, D hidden, F intermediate, E_l experts of the layer here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.checkpoint.quant.weights import QuantWeight, fuse_rows
from workers.quant.linear import QuantLinear, prepare


class QuantExpert:
    """``down(silu(gate(x)) * up(x))`` with w1 (gate) and w3 (up) as one [2F, D] matrix where their schemes and
    column orders agree (else two), w2 (down) [D, F]."""

    def __init__(self, w1: QuantWeight, w2: QuantWeight, w3: QuantWeight, *, device: torch.device, dtype: torch.dtype):
        fused = fuse_rows(w1, w3)
        self.gate_up = None if fused is None else prepare(fused, device=device, dtype=dtype)
        self.gate = None if fused is not None else prepare(w1, device=device, dtype=dtype)
        self.up = None if fused is not None else prepare(w3, device=device, dtype=dtype)
        self.down = prepare(w2, device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, D] -> [R, D]."""
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            assert self.gate is not None and self.up is not None
            gate, up = self.gate(x), self.up(x)
        return self.down(F.silu(gate) * up)

    def linears(self) -> list[QuantLinear]:
        return [m for m in (self.gate_up, self.gate, self.up, self.down) if m is not None]

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.linears())


class QuantExperts:
    """A layer's experts of this shard, in the order of their ids (the stack positions ``local`` indexes)."""

    def __init__(self, experts: list[QuantExpert]) -> None:
        self.experts = experts

    def run(self, xa: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """xa [A, D] grouped by expert, local [A] ascending stack positions -> each row through its expert [A, D]."""
        ids, counts = torch.unique_consecutive(local, return_counts=True)
        parts, start = [], 0
        for e, c in zip(ids.tolist(), counts.tolist(), strict=True):
            parts.append(self.experts[e](xa[start : start + c]))
            start += c
        return torch.cat(parts)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.experts)

    def describe(self) -> set[str]:
        """``kind: kernel`` of every matrix (``int4 g128: _weight_int4pack_mm_for_cpu`` ...)."""
        return {f"{m.kind}: {m.kernel}" for e in self.experts for m in e.linears()}

    def kernels(self, rows: int) -> set[str]:
        """The kernels a message of ``rows`` rows per expert runs (for logs and tests)."""
        return {m.kernel_for(rows) for e in self.experts for m in e.linears()}
