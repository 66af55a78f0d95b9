"""The two forms every quantized matrix takes in memory, whatever its checkpoint format, and their exact float32
dequantization: the reference the kernels (``workers.quant``) are tested against.

Letters: N output features (rows), K input features (columns), G group size (K: one scale per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cluster.config.quantization import ActivationScheme


@dataclass(frozen=True, eq=False)
class IntWeight:
    """An integer matrix: ``w[n, perm[k]] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]`` (perm None: the
    identity; GPTQ's act order stores the columns of a group together, perm says where each came from).

    ``q``: uint8; bits 8: [N, K]; bits 4: [N, K / 2], column 2j in the low nibble and 2j + 1 in the high one.
    ``scale``, ``zero``: float32 [N, K / G]; zero in q's units (2 ** (bits - 1) for a symmetric scheme).

    Example (bits 4, G = K = 2): q [[0x9A]] holds columns [10, 9]; zero [[8]], scale [[0.5]] -> w [[1.0, 0.5]].
    """

    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None  # int64 [K]

    @property
    def shape(self) -> tuple[int, int]:
        n, cols = self.q.shape
        return n, cols * 8 // self.bits

    def values(self) -> torch.Tensor:
        """q as one uint8 per element [N, K]."""
        return unpack_nibbles(self.q) if self.bits == 4 else self.q

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], columns in input-feature order."""
        g = self.group_size
        w = (self.values().float() - self.zero.repeat_interleave(g, 1)) * self.scale.repeat_interleave(g, 1)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.q, self.scale, self.zero, self.perm))


@dataclass(frozen=True, eq=False)
class FloatWeight:
    """An fp8 e4m3 matrix: ``w = data.float() * scale``; ``data`` [N, K], ``scale`` float32 [N, 1] (per channel)
    or [1, 1] (per tensor). ``input_scale``: the static activation scale [] when the scheme stores one;
    ``activations``: the scheme's activation quantization (a kernel that cannot do it runs weight-only)."""

    data: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    activations: ActivationScheme | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.data.shape
        return n, k

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scale

    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.data, self.scale, self.input_scale))


QuantWeight = IntWeight | FloatWeight


def unpack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> [N, K]: the low nibble first."""
    return torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)


def pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> [N, K / 2] (K even): column 2j in the low nibble."""
    return v[:, 0::2] | (v[:, 1::2] << 4)


def half_scales(scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scales (float) -> (h float16 of one shape, u a power of 2) with h * u as near each scale as float16 allows: u
    is 1 where that holds every scale exactly, else it puts the largest |scale| in [2^14, 2^15), so every scale within
    2^28 of it keeps 11 significant bits, and one that had at most 11 (a checkpoint's bfloat16 or float16 scales)
    comes back exactly. Smaller scales lose bits (a float16 subnormal) or round to 0; NaN and infinite ones stay so
    and leave the others as they would be without them.

    Example: [0.5, 0.75] -> h [0.5, 0.75], u = 1; [1e-5] -> h [21472.], u = 2^-31 (1e-5 to 11 bits).
    """
    h = scale.half()
    if same_values(h.float(), scale.float()):
        return h, 1.0
    finite = scale.abs()[scale.isfinite()]  # a NaN or infinite scale (its group's weights are) sets no unit
    top = float(finite.max()) if finite.numel() else 0.0
    unit = 2.0 ** (math.frexp(top)[1] - 15) if top > 0 else 1.0
    return (scale.float() / unit).half(), unit


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element by element, NaN equal to NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, W] -> uint8 [R, W * 32 / bits]: element i of a word in bits [i * bits, (i + 1) * bits), the
    low bits first (what compressed-tensors, AutoGPTQ and AutoAWQ all write, AWQ then reordering columns).

    Example: bits 4, words [[0x76543210]] -> [[0, 1, 2, 3, 4, 5, 6, 7]]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2).to(torch.uint8)


def from_values(
    values: torch.Tensor,
    *,
    bits: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    where: str,
) -> IntWeight:
    """An :class:`IntWeight` from unpacked values uint8 [N, K], float scale / zero [N, K / G] and, where stored, a
    group index per input feature [K] (``where`` names the tensor in errors). A g_idx that is ``k // G`` is dropped;
    any other must give every group exactly G features (GPTQ's act order), whose columns are then stored together."""
    from cluster.errors import CheckpointError

    n, k = values.shape
    groups = scale.shape[1]
    if k % groups:
        raise CheckpointError(f"{where}: {k} input features do not split into {groups} groups")
    g = k // groups
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if bool(((g_idx < 0) | (g_idx >= groups)).any()):
            raise CheckpointError(f"{where}: g_idx holds a group outside 0..{groups - 1}")
        if not torch.equal(g_idx, torch.arange(k) // g):
            order = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[order], torch.arange(k) // g):
                raise CheckpointError(f"{where}: g_idx does not give every group {g} input features")
            values, perm = values[:, order], order
    q = pack_nibbles(values) if bits == 4 else values.contiguous()
    return IntWeight(bits, q.contiguous(), scale.float().contiguous(), zero.float().contiguous(), g, perm)


def fuse_rows(a: QuantWeight, b: QuantWeight) -> QuantWeight | None:
    """``a`` over ``b`` as one matrix [Na + Nb, K] (w1 and w3 of an expert run as one), or None when their columns
    differ in order or their schemes differ."""
    if isinstance(a, IntWeight) and isinstance(b, IntWeight):
        same_perm = (a.perm is None and b.perm is None) or (
            a.perm is not None and b.perm is not None and torch.equal(a.perm, b.perm)
        )
        if a.bits != b.bits or a.group_size != b.group_size or not same_perm:
            return None
        cat = (torch.cat((x, y)) for x, y in ((a.q, b.q), (a.scale, b.scale), (a.zero, b.zero)))
        return IntWeight(a.bits, *cat, group_size=a.group_size, perm=a.perm)
    if isinstance(a, FloatWeight) and isinstance(b, FloatWeight) and a.activations == b.activations:
        scales = [s.expand(x.shape[0], 1) for s, x in ((a.scale, a.data), (b.scale, b.data))]
        same = a.input_scale is None and b.input_scale is None
        if not same and (a.input_scale is None or b.input_scale is None):
            return None
        input_scale = None if same else torch.maximum(a.input_scale, b.input_scale)  # type: ignore[arg-type]
        return FloatWeight(torch.cat((a.data, b.data)), torch.cat(scales).contiguous(), input_scale, a.activations)
    return None


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
