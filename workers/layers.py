"""Dense building blocks of a Mixtral layer: RMSNorm and rotary position embeddings (RoPE).

No Ray, no scheduling: plain functions over tensors. Shapes: T tokens in the step, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (as transformers' MixtralRMSNorm: x * rsqrt(mean(x^2) +
    eps)), here in torch's one-kernel ``F.rms_norm``, which computes in float32 for bf16/fp16 inputs too and gives
    the same bits as those ops on CPU (tests/unit/test_parity.py checks it)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


# ---------------------------------------------------------------------- RoPE
class Rope:
    """Rotary embedding with the rotate-half convention (Hugging Face layout of q/k rows)."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(device) / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, Dh] in ``dtype`` (computed in float32)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh] rotated by per-token cos/sin [T, 1, Dh]."""
    return x * cos + _rotate_half(x) * sin
