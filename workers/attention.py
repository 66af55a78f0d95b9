"""GQA attention over the paged KV cache, with the backend chosen in one place.

:func:`select_attention_backend` picks sdpa, eager or flash_attention_2; :class:`Attention` runs every path of a
step (prefill, chunked prefill, decode) through that backend, in float32 for bfloat16 models on a CPU without bf16
units (:func:`attention_compute_dtype`).

Shapes: T tokens in the step (flat, all sequences), H query heads, Hkv KV heads, Dh head dim,
B sequences in a group, n queries per sequence, L keys seen by a query.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from cluster.config.dtype import cpu_has_fast_bf16
from cluster.errors import SetupError
from workers.kv_cache import AttentionGroup, LayerKV, StepPlan

ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attention_2")


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
        raise SetupError(f"attention backend {requested!r} is unknown; use auto, {', '.join(ATTENTION_BACKENDS)}")
    if requested == "flash_attention_2" and not flash_ok:
        why = (
            "flash-attn is not installed"
            if not flash_attn_available()
            else f"it needs a CUDA device and float16/bfloat16 (got {dev.type}, {dtype})"
        )
        raise SetupError(f"attention backend 'flash_attention_2' cannot be used: {why}")
    return requested


def attention_compute_dtype(*, device: torch.device | str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype sdpa and eager attention compute in when it is not the model's: float32 for bfloat16 on a CPU
    without bf16 units, else None (the model's dtype). There torch's bfloat16 attention is emulated: on a 2-core
    AVX2 EPYC, Mixtral's heads, bfloat16 against float32 with the casts, decodes over 80-2048 keys (1 or 8 sequences)
    took 1.1-3.9x as long, prefill chunks and 32 decodes over 256 keys the same; the output is rounded to bfloat16
    once."""
    cpu = torch.device(device).type == "cpu"
    return torch.float32 if cpu and dtype == torch.bfloat16 and not cpu_has_fast_bf16() else None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, n, Dh], k/v [B, Hkv, L, Dh], mask [B, 1, n, L] or None (every key visible) -> [B, H, n, Dh]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


_KERNELS = {"sdpa": _sdpa, "eager": _eager}


class Attention:
    """Attention of one step for one layer: q [T, H, Dh], this step's k/v [T, Hkv, Dh] -> [T, H, Dh].

    The step's keys and values are written to the paged cache first; then every group reads its queries' keys
    from the cache (one gather per group, one kernel call per group: all decodes together, each prefill chunk
    alone). A step with one group (all decodes, or one chunk) holds its queries in step order: no gather of the
    queries and no scatter of the output.
    """

    def __init__(
        self,
        *,
        backend: str,
        num_heads: int,
        head_dim: int,
        window: int | None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.backend = backend
        self.compute_dtype = compute_dtype  # sdpa and eager: queries, keys and values cast to it (None: as they are)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.window = window

    def __call__(self, plan: StepPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        T, H, Dh = q.shape
        kv.write(plan, k, v)
        if len(plan.groups) == 1:  # its rows are 0..T-1 in order (see workers.kv_cache.plan_step)
            (g,) = plan.groups
            return self._group(g, q.unflatten(0, tuple(g.rows.shape)), kv).reshape(T, H, Dh)
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
        for g in plan.groups:
            out[g.rows.reshape(-1)] = self._group(g, q[g.rows], kv).reshape(-1, H, Dh)
        return out

    def _group(self, g: AttentionGroup, qg: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        """The group's queries qg [B, n, H, Dh] over its gathered keys -> [B, n, H, Dh]."""
        kg, vg = kv.gather(g.tables)  # [B, L, Hkv, Dh]
        if self.backend == "flash_attention_2":
            return self._flash(g, qg, kg, vg)
        q, k, v = (t.transpose(1, 2) for t in (qg, kg, vg))
        if self.compute_dtype is not None and self.compute_dtype != qg.dtype:
            q, k, v = (t.to(self.compute_dtype) for t in (q, k, v))
        out = _KERNELS[self.backend](q, k, v, g.mask, self.scale)
        return out.transpose(1, 2).to(qg.dtype)

    def _flash(
        self, g: AttentionGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - needs CUDA and flash-attn
        # optional dependency (the gpu extra): only importable where it was built
        from flash_attn import flash_attn_func  # pyright: ignore[reportMissingImports]

        outs = []
        for b, length in enumerate(g.lengths):
            # Keys run from the first gathered position to this sequence's last query; flash aligns the causal
            # mask to the last key, and its window hides whatever a sliding window has freed before that.
            outs.append(
                flash_attn_func(
                    q[b][None],
                    k[b, :length][None],
                    v[b, :length][None],
                    softmax_scale=self.scale,
                    causal=True,
                    window_size=(self.window - 1, 0) if self.window else (-1, -1),
                )[0]
            )
        return torch.stack(outs)
