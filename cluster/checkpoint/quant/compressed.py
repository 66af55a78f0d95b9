"""compressed-tensors (``pack-quantized``, ``naive-quantized``, ``float-quantized``) and AutoFP8 (``fp8``): the
tensors one quantized linear stores, and the :class:`IntWeight` / :class:`FloatWeight` they make.

Letters: N output features, K input features, b bits, Ng groups (K / G; 1 per channel or tensor).

    pack-quantized   weight_packed int32 [N, K b / 32]  (element i of a row in bits [i b, (i + 1) b) of the row's
                     words, offset by 2^(b-1) to be unsigned), weight_shape [2] = (N, K), weight_scale [N, Ng];
                     asymmetric: weight_zero_point int32 [N b / 32, Ng] packed the same way down the columns
    naive-quantized  weight int8 [N, K] (signed), weight_scale [N, Ng]; asymmetric: weight_zero_point [N, Ng]
    float-quantized  weight float8_e4m3fn [N, K], weight_scale [N, 1] or [1]; static activations: input_scale [1]
    fp8 (AutoFP8)    weight float8_e4m3fn [N, K], weight_scale [] (per tensor); static: input_scale []

w = (q - zero) * scale, as compressed-tensors' own ``dequantize`` computes it (there in the scale's dtype; here
in float32).
"""

from __future__ import annotations

import torch

from cluster.checkpoint.quant.parts import FLOATS, INTS, SCALAR, Part, groups_of
from cluster.checkpoint.quant.weights import FloatWeight, QuantWeight, from_values, unpack_words
from cluster.config.quantization import WeightScheme
from cluster.errors import CheckpointError


def parts(scheme: WeightScheme, n: int, k: int, *, module: str) -> dict[str, Part]:
    b, ng = scheme.num_bits, groups_of(scheme, k, module=module)
    scale_shapes = SCALAR if scheme.strategy == "tensor" else ((n, ng),)
    out: dict[str, Part] = {}
    if scheme.type == "float":
        out["weight"] = Part(((n, k),), (torch.float8_e4m3fn,))
        if scheme.strategy == "channel":
            scale_shapes = ((n, 1), (n,))
    elif scheme.format == "pack-quantized":
        out["weight_packed"] = Part(((n, -(-k * b // 32)),), (torch.int32,))
        out["weight_shape"] = Part(((2,),), INTS)
    else:
        out["weight"] = Part(((n, k),), (torch.int8,))
    out["weight_scale"] = Part(scale_shapes, FLOATS)
    if not scheme.symmetric:
        packed_zero = scheme.format == "pack-quantized" and scheme.strategy != "tensor"
        zero_shapes = ((-(-n * b // 32), ng),) if packed_zero else scale_shapes
        out["weight_zero_point"] = Part(zero_shapes, (torch.int32,) if packed_zero else INTS + FLOATS)
    if scheme.g_idx:
        out["weight_g_idx"] = Part(((k,),), INTS)
    if scheme.activations is not None and not scheme.activations.dynamic:
        out["input_scale"] = Part(SCALAR, FLOATS)
    return out


def assemble(scheme: WeightScheme, t: dict[str, torch.Tensor], n: int, k: int, *, where: str) -> QuantWeight:
    if scheme.type == "float":
        scale = t["weight_scale"].float().reshape(-1, 1)
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise CheckpointError(f"{where}: weight_scale holds a value that is not a positive number")
        input_scale = t["input_scale"].float().reshape(()) if "input_scale" in t else None
        return FloatWeight(t["weight"], scale.contiguous(), input_scale, scheme.activations)
    b, offset = scheme.num_bits, 1 << (scheme.num_bits - 1)
    if scheme.format == "pack-quantized":
        stored = [int(v) for v in t["weight_shape"].tolist()]
        if stored != [n, k]:
            raise CheckpointError(f"{where}: weight_shape is {stored}, expected {[n, k]} for this config")
        values = unpack_words(t["weight_packed"], b)[:, :k]
    else:
        w = t["weight"].to(torch.int16)
        if bool(((w < -offset) | (w >= offset)).any()):
            raise CheckpointError(f"{where}: weight holds values outside the {b}-bit range")
        values = (w + offset).to(torch.uint8)
    ng = groups_of(scheme, k, module=where)
    scale = t["weight_scale"].float().reshape(-1, ng).expand(n, ng)
    return from_values(
        values, bits=b, scale=scale, zero=_zero(scheme, t, n, ng, offset), g_idx=t.get("weight_g_idx"), where=where
    )


def _zero(scheme: WeightScheme, t: dict[str, torch.Tensor], n: int, ng: int, offset: int) -> torch.Tensor:
    """Zero points in q's unsigned units, float32 [N, Ng]."""
    if scheme.symmetric:
        return torch.full((n, ng), float(offset))
    zp = t["weight_zero_point"]
    if scheme.format == "pack-quantized" and scheme.strategy != "tensor":
        # packed down the columns: transposed, each row of Ng groups is one packed row
        return unpack_words(zp.t().contiguous(), scheme.num_bits)[:, :n].t().float()
    return (zp.float() + offset).reshape(-1, ng).expand(n, ng)
