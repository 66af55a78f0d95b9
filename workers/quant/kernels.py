"""Which quantized-matmul kernels this process can run, and where each one stops paying off. No Ray here.

torch's kernels are private ops that exist for some devices, dtypes and shapes only, so each is tried once on the
shapes it will get (:func:`works`); the fused CPU kernel (``workers.quant.cpu_kernel``) needs a C compiler at its
first use; the dequantize-then-matmul path (``workers.quant.linear.DequantLinear``) takes over where none runs.
Nothing here is required to run.

    kind  device        activations  kernel                                   rows per expert
    int8  cpu           bf16, with   torch._weight_int8pack_mm                <= 8; above: dequantize + matmul
                        bf16 units
    int8  cpu           otherwise    fused CPU kernel                         <= FUSED_MAX_ROWS; above: dequantize
    int8  cuda          any          torch._weight_int8pack_mm                <= 16; above: dequantize + matmul
    int4  cpu           float32      fused CPU kernel (groups of 16k)         <= FUSED_MAX_ROWS; above: dequantize
    int4  cpu           bf16, fp16   torch._weight_int4pack_mm_for_cpu        all
    int4  cuda          bf16         torch._weight_int4pack_mm (tinygemm)     all
    fp8   cuda sm89+    bf16, fp16   torch._scaled_mm, activations quantized  all, when the scheme quantizes them
    fp8   cpu           any          fused CPU kernel (weight-only)           <= FUSED_MAX_ROWS; above: dequantize
    any   any           any          dequantize + matmul, in row chunks       the rest

The row limits are measured crossovers (``mixserve bench engine --quantization``' kernel table; one Mixtral expert
matrix 14336 x 4096, 2-core CPUs). A kernel that reads 1 byte per weight costs more with every row, while the
dequantize path pays its conversion once for all rows. Median ms at 1 / 8 / 32 / 64 rows, CPU without bf16 units,
bfloat16 activations (2026-12-07):

    int8 fused CPU kernel          3.2 / 14.4 / 46.0 / 61.3     dense bf16 F.linear   7.9 / 28.0 / 71.3 / 136
    int8 _weight_int8pack_mm       2.8 / 8.1 / 36.8 / 74.5      dense fp32 F.linear   9.2 / 26.7 / 27.5 / 41.0
    int8 dequantize + matmul       20.1 / 38.2 / 95.7 / 78.5
    fp8 fused CPU kernel           4.1 / 16.1 / 42.4 / 99.9
    fp8 dequantize + matmul        43.7 / 56.1 / 114 / 103

and with bf16 units (issue 19's figures): ``_weight_int8pack_mm`` 2.12 / 7.78 / 27.3, dense bf16 5.75 / 7.23 / 12.4
at 1 / 8 / 32 rows, so there bf16 activations keep torch's kernel, up to 8 rows. Without bf16 units the dequantize path
multiplies in float32 (``dequant_matmul_dtype``); torch's int8 kernel in float32 (44 / 396 / 1969 ms) and its int4
kernel in float32 (78 / 496 / 1834 ms) are far slower than the fused one, which is why float32 never runs them.
Where the fused kernel is off (``$MIXSERVE_CPU_KERNEL=off``, or no C compiler): int8 on a CPU runs torch's kernel up
to 8 rows with bf16 units, 32 without them, never for float32 activations (:func:`int8_kernel_max_rows`); int4 runs
torch's kernel in every dtype; fp8 dequantizes on every call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from cluster.config.dtype import cpu_has_fast_bf16

log = logging.getLogger("mixserve.quant")

INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 kernels take
FUSED_MAX_ROWS = 32  # rows per call up to which the fused CPU kernel beats dequantize + matmul (table above)
DEQUANT_CHUNK_ELEMENTS = 1 << 21  # weights dequantized at once (8 MiB of float32): stays in cache, bounds memory

_WORKS: dict[tuple, bool] = {}
_LOGGED: set[str] = set()


def works(key: tuple, attempt: Callable[[], object]) -> bool:
    """Whether ``attempt()`` runs without an error, remembered per ``key`` (device, dtype and shape)."""
    if key not in _WORKS:
        try:
            attempt()
            _WORKS[key] = True
        except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError) as e:
            log.info("quantized kernel %s unavailable here: %s", key[0], str(e).splitlines()[0][:200])
            _WORKS[key] = False
    return _WORKS[key]


def note(message: str, *, level: int = logging.INFO) -> None:
    """Log a kernel choice once per process (the worker's log: which kernel runs where)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, "%s", message)


def int4_kernel_group(group: int) -> int | None:
    """The group size torch's int4 kernels run for a scheme's group (a channel scheme's K is cut into the largest
    kernel group that divides it, its scales repeated), None when none divides it."""
    return next((g for g in INT4_GROUPS if group % g == 0), None)


def int8_kernel_max_rows(device: torch.device, dtype: torch.dtype) -> int:
    """Rows per call up to which ``_weight_int8pack_mm`` beats dequantize + matmul, where the fused CPU kernel does
    not run instead (module docstring's table)."""
    if device.type == "cuda":
        return 16
    if dtype == torch.float32:
        return 0
    return 8 if cpu_has_fast_bf16() else 32


def dequant_matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype dequantized chunks are multiplied in: float32 for bfloat16 activations on a CPU without bf16 units
    (there a bfloat16 matmul is emulated, 2-3x slower than float32's: the table above), the product rounded to
    bfloat16 once, which is nearer the exact product than rounding the weights first; else ``dtype``."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


def fp8_matmul_device(device: torch.device) -> bool:
    """A CUDA device with FP8 tensor cores (compute capability 8.9 or newer) for ``torch._scaled_mm``."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def has_op(name: str) -> bool:
    return getattr(torch, name, None) is not None or hasattr(torch.ops.aten, name)
