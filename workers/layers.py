"""The dense math of a Mixtral layer: RMSNorm, RoPE, GQA attention (three backends), SwiGLU.

No Ray, no scheduling: plain functions over tensors. Shapes use
T tokens in the step (flat, all sequences), H query heads, Hkv KV heads, Dh head dim, D hidden,
B sequences in a group, L keys seen by a query.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attention_2")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (as transformers' MixtralRMSNorm)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert: ``w2(silu(w1 x) * w3 x)``. x [N, D] -> [N, D]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


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


# ---------------------------------------------------------------------- attention
@dataclass
class AttentionGroup:
    """Queries of one or more sequences attended together, with keys = cached keys ++ this step's keys.

    rows      [B, n]   indices into the step's flat token axis (queries of each sequence, n per sequence)
    slots     [B]      KV-cache slot of each sequence
    cached    int      how many cache entries to read per sequence (max over the group)
    mask      [B, 1, n, cached + n] bool, True where a query may see a key (causal, sliding window, validity)
    key_order [B, cached + n] or None: key indices sorted by position (flash-attention needs keys in order)
    """

    rows: torch.Tensor
    slots: torch.Tensor
    cached: int
    mask: torch.Tensor
    key_order: torch.Tensor | None = None


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, n, Dh], k/v [B, Hkv, L, Dh], mask [B, 1, n, L] -> [B, H, n, Dh]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_attention_backend(requested: str, *, device: torch.device | str, dtype: torch.dtype) -> str:
    """Pick the attention backend actually used.

    ``auto``: flash_attention_2 when flash-attn imports and the model runs on CUDA in fp16/bf16, else sdpa.
    Asking for flash_attention_2 where it cannot run is an error rather than a silent fallback.
    """
    dev = torch.device(device)
    flash_ok = flash_attn_available() and dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {requested!r} is unknown; use auto, {', '.join(ATTENTION_BACKENDS)}")
    if requested == "flash_attention_2" and not flash_ok:
        why = (
            "flash-attn is not installed"
            if not flash_attn_available()
            else f"it needs a CUDA device and float16/bfloat16 (got {dev.type}, {dtype})"
        )
        raise ValueError(f"attention backend 'flash_attention_2' cannot be used: {why}")
    return requested


def attend_group(
    group: AttentionGroup,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    backend: str,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention output for the group's queries, [B, n, H, Dh].

    q [T, H, Dh], k_new/v_new [T, Hkv, Dh] for the whole step; k_cache/v_cache [slots, S, Hkv, Dh] for this layer.
    """
    qg = q[group.rows]  # [B, n, H, Dh]
    kg = k_new[group.rows]  # [B, n, Hkv, Dh]
    vg = v_new[group.rows]
    if group.cached:
        kc = k_cache[group.slots, : group.cached]  # [B, cached, Hkv, Dh]
        vc = v_cache[group.slots, : group.cached]
        kg = torch.cat((kc, kg), dim=1)
        vg = torch.cat((vc, vg), dim=1)
    if backend == "flash_attention_2":
        return _flash(group, qg, kg, vg, scale=scale, window=window)
    fn = _sdpa if backend == "sdpa" else _eager
    out = fn(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), group.mask, scale)
    return out.transpose(1, 2)


def _flash(
    group: AttentionGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None
) -> torch.Tensor:  # pragma: no cover - needs CUDA and flash-attn
    from flash_attn import flash_attn_func

    outs = []
    for b in range(q.shape[0]):
        valid = group.mask[b, 0].any(dim=0)  # keys some query of this sequence may see: contiguous positions
        order = group.key_order[b] if group.key_order is not None else torch.arange(k.shape[1], device=k.device)
        order = order[valid[order]]
        kb, vb = k[b, order][None], v[b, order][None]
        outs.append(
            flash_attn_func(
                q[b][None],
                kb,
                vb,
                softmax_scale=scale,
                causal=True,
                window_size=(window - 1, 0) if window else (-1, -1),
            )[0]
        )
    return torch.stack(outs)
