"""Dense matrix products (attention, lm_head, dense experts): ``F.linear``, except bfloat16 weights on a CPU without
bf16 units at up to ``FUSED_MAX_ROWS`` rows, which run through the fused CPU kernel (``workers.quant.cpu_kernel``:
each weight widened to float32 in registers, products summed in float32, the result rounded to bfloat16 once, as
torch's bf16 matmul rounds). No Ray here.

There torch emulates bfloat16 matmuls; the kernel reads the matrix once per 8 rows instead. Median ms on the 2-core
CI VM (Xeon @ 2.80 GHz, AVX-512, no avx512_bf16, torch 2.13):

    rows                                   1      2      4      8     16     32
    14336 x 4096 (an expert's w1)  F.linear  6.58   7.26   19.1   25.8   41.2   70.1
                                   fused     4.27   4.33   9.24   12.2   19.0   33.7
    6144 x 4096 (Mixtral's qkv)    F.linear  2.94   3.02   8.10   11.4   18.3   30.0
                                   fused     1.77   1.78   2.16   6.50   10.6   16.6

On a 2-core AMD EPYC with AVX2 and no AVX-512 (the kernel's AVX2 build), the expert matrix at 1 / 8 / 32 rows:
``F.linear`` 6.28 / 45.5 / 174, fused 4.48 / 8.81 / 42.0.

With bf16 units torch multiplies bf16 in hardware near the bytes floor (issue 19: 5.75 / 7.23 / 12.4 ms at 1 / 8 /
32 rows of the expert matrix), so ``F.linear`` stays.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from cluster.config.dtype import FAST_BF16_ENV, cpu_has_fast_bf16
from workers.quant import cpu_kernel
from workers.quant.kernels import FUSED_MAX_ROWS

_ONE = torch.ones(1)  # the kernel's scale for unscaled weights
_CHOSEN: dict[tuple[str, str], cpu_kernel.Kernel | None] = {}


def bf16_kernel() -> cpu_kernel.Kernel | None:
    """The fused kernel when this CPU has no bf16 units and the kernel is not off, else None (decided once per
    setting of ``$MIXSERVE_CPU_FAST_BF16`` and ``$MIXSERVE_CPU_KERNEL``)."""
    key = (os.environ.get(FAST_BF16_ENV, ""), os.environ.get(cpu_kernel.ENV, ""))
    if key not in _CHOSEN:
        _CHOSEN[key] = None if cpu_has_fast_bf16() else cpu_kernel.kernel()
    return _CHOSEN[key]


def fused_kernel(w: torch.Tensor, rows: int, dtype: torch.dtype) -> cpu_kernel.Kernel | None:
    """The kernel that multiplies ``rows`` rows of ``dtype`` by w [N, K] here, or None for ``F.linear``."""
    if w.dtype != torch.bfloat16 or dtype != torch.bfloat16 or w.device.type != "cpu":
        return None
    return bf16_kernel() if 0 < rows <= FUSED_MAX_ROWS else None


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K].T -> [M, N] in x's dtype, as ``F.linear(x, w)`` (which takes every case the kernel does
    not: other shapes, devices and dtypes, and inputs autograd tracks).

    Example: x [[1., 2.]] and w [[3., -1.], [0., 1.]] in bfloat16 -> [[1., 2.]] (either way).
    """
    plain = x.dim() != 2 or w.dim() != 2 or x.device.type != "cpu" or not 0 < x.shape[1] == w.shape[1]
    if plain or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return F.linear(x, w)
    kernel = fused_kernel(w, x.shape[0], x.dtype)
    if kernel is None:
        return F.linear(x, w)
    return kernel.linear(x, w, _ONE).to(x.dtype)
