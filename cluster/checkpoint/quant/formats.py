"""What a quantized linear module stores, per format (:func:`parts_of`), and the in-memory form its stored tensors
make (:func:`assemble`): ``cluster.checkpoint.quant.compressed`` (compressed-tensors, AutoFP8) and
``cluster.checkpoint.quant.gptq`` (GPTQ, AWQ)."""

from __future__ import annotations

import torch

from cluster.checkpoint.quant import compressed, gptq
from cluster.checkpoint.quant.parts import Part
from cluster.checkpoint.quant.weights import QuantWeight
from cluster.config.quantization import WeightScheme


def parts_of(scheme: WeightScheme, n: int, k: int, *, module: str) -> dict[str, Part]:
    """Suffix (``weight_packed``, ``qweight`` ...) -> :class:`Part`, for a module of weight [N, K]."""
    if scheme.format in ("gptq", "awq"):
        return gptq.parts(scheme, n, k, module=module)
    return compressed.parts(scheme, n, k, module=module)


def assemble(scheme: WeightScheme, tensors: dict[str, torch.Tensor], n: int, k: int, *, where: str) -> QuantWeight:
    """The stored tensors of one module (checked against :func:`parts_of`) -> its in-memory form."""
    if scheme.format in ("gptq", "awq"):
        return gptq.assemble(scheme, tensors, n, k, where=where)
    return compressed.assemble(scheme, tensors, n, k, where=where)
