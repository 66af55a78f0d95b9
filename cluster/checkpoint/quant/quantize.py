"""Quantize-on-load: a dense expert matrix -> the form ``quantization="int8" | "int4" | "fp8"`` keeps in memory
(weight-only, scales from the weights themselves, as vLLM's ``--quantization fp8`` does; no calibration data).

Letters: N output features, K input features, G group size.

    int8  one scale per output feature, symmetric: q = round(w / s) + 128, s = max |w[n]| / 127
    int4  groups of G = 128 input features (the largest of 128, 64, 32 that divides K; else one group per row),
          zero points: s = (max - min) / 15 to 11 significant bits (``half_scales``), zero = round(-min / s),
          q = clamp(round(w / s) + zero, 0, 15)
    fp8   e4m3, one scale per output feature: s = max |w[n]| / 448

Example: ``quantize(torch.tensor([[0.5, -1.0]]), "int8")`` -> q [[192, 1]] (64 + 128, -127 + 128), scale 1 / 127.
"""

from __future__ import annotations

import torch

from cluster.checkpoint.quant.weights import FloatWeight, IntWeight, QuantWeight, half_scales, pack_nibbles
from cluster.config.quantization import OnLoad

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # an all-zero row or group still gets a positive scale


def int4_group_size(k: int) -> int:
    return next((g for g in (128, 64, 32) if k % g == 0), k)


def quantize(w: torch.Tensor, kind: OnLoad) -> QuantWeight:
    """w [N, K] (any float dtype; computed in float32) -> its ``kind`` form."""
    w = w.float()
    n, k = w.shape
    if kind == "fp8":
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_TINY)  # [N, 1]
        return FloatWeight((w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale)
    if kind == "int8":
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(_TINY)  # [N, 1]
        q = (torch.round(w / scale).clamp(-127, 127) + 128).to(torch.uint8)
        return IntWeight(8, q, scale, torch.full((n, 1), 128.0), group_size=k)
    g = int4_group_size(k)
    groups = w.view(n, k // g, g)
    lo, hi = groups.amin(-1).clamp_max(0), groups.amax(-1).clamp_min(0)  # [N, K / G]: 0 stays representable
    scale = (hi - lo) / 15
    # float16 scales times a power of 2 (what the fused CPU kernel holds, exactly), none below 2^-24 of the largest
    finite = scale[scale.isfinite()]  # a group with a NaN or infinite weight leaves the others' scales alone
    scale = scale.clamp_min(max(float(finite.max()) * 2**-24, _TINY) if finite.numel() else _TINY)
    half, unit = half_scales(scale)
    scale = half.float() * unit
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return IntWeight(4, pack_nibbles(q).contiguous(), scale, zero, group_size=g)
