"""A frontend linear layer whose rows may come from several stored modules, each dense or quantized: attention's
q, k and v as one qkv projection, its o projection. No Ray here.

    y [M, N] = x [M, K] @ w.T,   w = the parts' rows stacked in order (q over k over v)

:meth:`Projection.build` keeps as few matrices as the parts allow, so a step makes as few matmuls as it can:

- every part dense: one dense matrix (``workers.dense.linear``), as torch.cat of the parts in the model's dtype;
- every part quantized with one scheme and one column order: one :class:`QuantLinear` (``fuse_rows``);
- anything else (a dense k beside a quantized q, GPTQ's act order giving q, k and v each their own column order):
  each part on its own, their outputs concatenated.

Quantized parts stay quantized: the frontend of a W4A16 checkpoint holds its attention in int4, never a dense copy.
``quantize_attention=True`` (with ``quantization="int4"`` ...) hands a dense checkpoint's parts to :meth:`build`
already quantized.

Letters: M rows of x, N output features (the parts' together), K input features.

Example: ``Projection.build([q, k, v], device=cpu, dtype=torch.bfloat16)`` with three dense [8, 4], [2, 4], [2, 4]
tensors -> one bfloat16 [12, 4] matrix; ``p(x)`` for x [3, 4] -> [3, 12].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import torch

from cluster.checkpoint.quant.weights import QuantWeight, fuse_rows
from workers import dense
from workers.quant.linear import QuantLinear, prepare

Part = torch.Tensor | QuantLinear


class Projection:
    """y [M, N] = x [M, K] @ w.T over the parts' stacked rows (see the module docstring)."""

    def __init__(self, parts: Sequence[Part]) -> None:
        widths = {_shape(p)[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(f"the parts of a projection take inputs of one width, not {sorted(widths)}")
        self.parts = list(parts)
        self.shape = (sum(_shape(p)[0] for p in parts), widths.pop())

    @classmethod
    def placeholder(cls, n: int, k: int) -> Projection:
        """A [n, k] projection that holds no memory, until the checkpoint's weights replace it."""
        return cls([torch.empty(n, k, device="meta")])

    @classmethod
    def build(
        cls, weights: Sequence[torch.Tensor | QuantWeight], *, device: torch.device | str, dtype: torch.dtype
    ) -> Projection:
        """The parts, in order, on ``device``: dense ones in ``dtype``, quantized ones in the form their kernel
        runs (``workers.quant.linear.prepare``), fused into one matrix where they allow it."""
        device = torch.device(device)
        if all(isinstance(w, torch.Tensor) for w in weights):
            return cls([torch.cat([w.to(dtype) for w in weights]).to(device).contiguous()])  # type: ignore[union-attr]
        quantized = [w for w in weights if not isinstance(w, torch.Tensor)]
        if len(quantized) == len(weights):
            fused = reduce(lambda a, b: None if a is None else fuse_rows(a, b), quantized[1:], quantized[0])
            if fused is not None:
                return cls([prepare(fused, device=device, dtype=dtype, role="attention")])
        return cls([
            w.to(dtype).to(device).contiguous()
            if isinstance(w, torch.Tensor)
            else prepare(w, device=device, dtype=dtype, role="attention")
            for w in weights
        ])  # fmt: skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        outs = [dense.linear(x, p) if isinstance(p, torch.Tensor) else p(x) for p in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def numel(self) -> int:
        """Weights in the matrix (N x K), however they are stored."""
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() if isinstance(p, torch.Tensor) else p.nbytes() for p in self.parts)

    def describe(self) -> list[str]:
        """Each part's form: its dtype when dense, ``kind: kernel`` when quantized (``int4 g128: ...``)."""
        return [str(p.dtype).removeprefix("torch.") if isinstance(p, torch.Tensor) else f"{p.kind}: {p.kernel}"
                for p in self.parts]  # fmt: skip


def matrix_bytes(m: torch.Tensor | Projection) -> int:
    """Bytes a matmul by ``m`` reads: a dense matrix's, or a projection's as stored (quantized with its scales)."""
    return m.nbytes() if isinstance(m, Projection) else m.numel() * m.element_size()


def _shape(p: Part) -> tuple[int, int]:
    n, k = p.shape
    return int(n), int(k)
