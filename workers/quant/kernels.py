"""Which quantized-matmul kernels this process can run, and where each one stops paying off. No Ray here.

torch's kernels are private ops that exist for some devices, dtypes and shapes only, so each is tried once on the
shapes it will get (:func:`works`); the fused CPU kernel (``workers.quant.cpu_kernel``) needs a C compiler at its
first use; the dequantize-then-matmul path (``workers.quant.linear.DequantLinear``) takes over where none runs.
Nothing here is required to run.

    kind  device        activations  kernel                                   rows per expert
    int8  cpu           float32      fused CPU kernel                         <= FUSED_MAX_ROWS; above: dequantize
    int8  cpu           bf16, fp16   torch._weight_int8pack_mm                <= 8 with bf16 units, 32 without
    int8  cpu (AVX2)    bf16         fused CPU kernel (no bf16 units)         <= FUSED_MAX_ROWS; above: dequantize
    int8  cuda          any          torch._weight_int8pack_mm                <= 16; above: dequantize + matmul
    int4  cpu           float32      fused CPU kernel (16k groups, z 0-255)   <= FUSED_MAX_ROWS; above: dequantize
    int4  cpu           bf16, fp16   torch._weight_int4pack_mm_for_cpu        all (groups divisible by 32)
    int4  cpu (AVX2)    bf16         fused CPU kernel (no bf16 units, 16k)    <= FUSED_MAX_ROWS; above: dequantize
    int4  cuda          bf16         torch._weight_int4pack_mm (tinygemm)     all
    fp8   cuda sm89+    bf16, fp16   torch._scaled_mm, activations quantized  all, when the scheme quantizes them
    fp8   cpu           any          fused CPU kernel (weight-only)           <= FUSED_MAX_ROWS; above: dequantize
    any   any           any          dequantize + matmul, in row chunks       the rest

The row limits are measured crossovers (``mixserve bench engine --quantization``' kernel table; one Mixtral expert
matrix 14336 x 4096, 2-core CPUs). A kernel that reads 1 byte per weight costs more with every row, while the
dequantize path pays its conversion once for all rows. Median ms at 1 / 8 / 32 / 64 rows on a Xeon @ 2.80 GHz with
AVX-512 and no bf16 units, the fused kernel's AVX-512 build (2026-12-07):

    bfloat16 activations                                   float32 activations
    int8 _weight_int8pack_mm   3.19 / 9.69 / 35.8 / 84.5    int8 fused CPU kernel      2.37 / 7.07 / 28.1 / 59.9
    int8 fused CPU kernel      3.23 / 13.0 / 39.8 / 86.7    int8 _weight_int8pack_mm   44.3 / 396 / 1969 / 2867
    int8 dequantize + matmul   20.1 / 33.4 / 93.3 / 78.8    int8 dequantize + matmul   18.5 / 28.9 / 75.7 / 74.0
    fp8 fused CPU kernel       3.24 / 15.0 / 43.8 / 105     int4 fused CPU kernel      3.50 / 9.15 / 39.6 / 92.8
    fp8 dequantize + matmul    42.2 / 49.3 / 98.4 / 73.2    int4 _weight_int4pack_mm   69.2 / 463 / 1759 / 3830
    dense bf16 F.linear        10.1 / 30.9 / 88.1 / 151    fp8 fused CPU kernel       3.21 / 8.87 / 37.9 / 73.5
    dense fp32 F.linear        8.82 / 29.7 / 38.2 / 52.6    dense fp32 F.linear        8.25 / 28.1 / 32.8 / 40.9

On a 2-core AMD EPYC with AVX2 but no AVX-512, where the fused kernel is its AVX2 build, bfloat16 activations, 1 /
8 / 32 rows, after the kernel moved onto torch's OpenMP threads and int4 to per-group scaling (sixth session,
2026-12-07; before, its own threads shared the cores with torch's spinning ones, which cost it up to 2x above 2 rows,
so earlier runs there and on the Xeon above understate it): int4 fused 1.89 / 7.81 / 31.8 against
``_weight_int4pack_mm_for_cpu`` 4.32 / 11.0 / 44.4; int8 fused 2.21 / 7.20 / 36.7 against ``_weight_int8pack_mm``
3.10 / 11.5 / 55.4 (an A/B of the two, the fused kernel ahead at every row count 1-32); fp8 fused 2.82 / 9.05 / 36.5;
dense bf16 fused 3.86 / 8.53 / 34.0. So there bfloat16 int8 and int4 run the fused kernel up to 32 rows
(:func:`fused_runs_int`).

With bf16 units (issue 19's figures): ``_weight_int8pack_mm`` 2.12 / 7.78 / 27.3 and dense bf16 5.75 / 7.23 / 12.4
at 1 / 8 / 32 rows. So bfloat16 activations keep torch's int8 kernel (up to 8 rows with bf16 units, 32 without:
:func:`int8_kernel_max_rows`; without them the AVX2 build runs instead); float32 activations never run torch's
int8 or int4 kernels on a CPU: where the fused kernel is off (``$MIXSERVE_CPU_KERNEL=off``, or no C compiler) they
dequantize, as fp8 then does on every call. Without bf16 units the dequantize path multiplies in float32
(``dequant_matmul_dtype``).
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
    """Rows per call up to which ``_weight_int8pack_mm`` beats dequantize + matmul (module docstring's table)."""
    if device.type == "cuda":
        return 16
    if dtype == torch.float32:
        return 0
    return 8 if cpu_has_fast_bf16() else 32


def fused_runs_int(dtype: torch.dtype, simd: int) -> bool:
    """Whether int8 and int4 weights under ``dtype`` activations on a CPU run the fused CPU kernel of SIMD width
    ``simd`` (``cpu_kernel.Kernel.simd``) rather than torch's kernels: float32 always (torch's take 19-70x longer
    there); bfloat16 from the AVX2 build on a CPU without bf16 units, which beat ``_weight_int8pack_mm`` and
    ``_weight_int4pack_mm_for_cpu`` at 1-32 rows (module docstring); not from the AVX-512 build, which lost to torch's
    int8 kernel at 4-32 rows and to its int4 kernel at one row (measured while its threads still shared the cores
    with torch's: to be measured again on such a CPU), nor from the portable one."""
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and simd == 256 and not cpu_has_fast_bf16()


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
