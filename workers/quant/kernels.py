"""Which quantized-matmul kernels this process can run, and where each one stops paying off. No Ray here.

torch's kernels are private ops that exist for some devices, dtypes and shapes only, so each is tried once on the
shapes it will get (:func:`works`) and the dequantize-then-matmul path (``workers.quant.linear.DequantLinear``) takes
over where one fails; nothing here is required to run.

    kind  device        kernel                                   rows per expert
    int8  cpu, cuda     torch._weight_int8pack_mm                 <= int8_kernel_max_rows(); above: dequantize + matmul
    int4  cpu           torch._weight_int4pack_mm_for_cpu         all
    int4  cuda          torch._weight_int4pack_mm (tinygemm)      all (bf16 only)
    fp8   cuda sm89+    torch._scaled_mm, activations quantized   all, when the scheme quantizes activations
    any   any           dequantize + matmul, in row chunks        the rest

The int8 row limit is the measured crossover (``mixserve bench engine --quantization``' kernel table; one Mixtral
expert matrix 14336 x 4096, 2-core CPUs): ``_weight_int8pack_mm`` reads 1 byte per weight but its cost grows with
every row, while the dequantize path pays the conversion once for all rows. Median ms at 1 / 8 / 32 / 64 rows:

    CPU, compute dtype                 _weight_int8pack_mm        dequantize + matmul       dense F.linear
    avx512_bf16, bfloat16              2.12 / 7.78 / 27.3 / -     -                         5.75 / 7.23 / 12.4 / -
    no bf16 units, bfloat16            4.3 / 11.9 / 53.5 / 105    27.3 / 39.8 / 95.6 / 87.2  8.9 / 30.4 / 89.6 / 171
    no bf16 units, float32             44.3 / 396 / 1969 / 2867   39.4 / 65.2 / 117 / 86.4  9.5 / 26.4 / 38.8 / 54.1

(Without bf16 units the dequantize path multiplies in float32: ``dequant_matmul_dtype``.) So: up to 8 rows with bf16
units, up to 32 without them, and never for float32 activations (the kernel's float32 path is slower than
dequantizing). On CUDA up to 16 rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from cluster.config.dtype import cpu_has_fast_bf16

log = logging.getLogger("mixserve.quant")

INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 kernels take
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
