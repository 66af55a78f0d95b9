"""A quantized matrix ready for one device and compute dtype: ``y = x @ w.T`` through the kernel that suits the
rows it gets (``workers.quant.kernels``). :func:`prepare` picks the form once, at load; no Ray here.

Letters: M rows of x, N output features, K input features, G group size (Gk: the kernel's).
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from cluster.checkpoint.quant.weights import (
    FloatWeight,
    IntWeight,
    QuantWeight,
    half_scales,
    same_values,
    unpack_nibbles,
)
from workers.quant import cpu_kernel
from workers.quant.kernels import (
    DEQUANT_CHUNK_ELEMENTS,
    FUSED_MAX_ROWS,
    dequant_matmul_dtype,
    fp8_matmul_device,
    fused_runs_int,
    int4_kernel_group,
    int8_kernel_max_rows,
    log,
    note,
)

_FP8_MAX = 448.0
_E4M3_AS_F16 = -16512  # 0xBF80: (byte sign-extended << 7) & 0xBF80 are the float16 bits of its value times 2^-8
aten = torch.ops.aten  # torch's quantized matmuls are private ops; reached here, typed as the dispatcher's


class QuantLinear:
    """y [M, N] = x [M, K] @ w.T, w stored quantized. ``perm``: the stored column order (GPTQ act order)."""

    kernel = "a quantized matmul"
    kind = ""  # int4 g128, int8, fp8 ... (set by prepare)

    def __init__(self, shape: tuple[int, int], perm: torch.Tensor | None) -> None:
        self.shape = shape
        self.perm = perm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x if self.perm is None else x[:, self.perm])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel_for(self, rows: int) -> str:
        return self.kernel

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.perm]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


class Scratch(threading.local):
    """Flat buffers reused by every dequantizing call of one thread, one per (device, dtype), grown to the largest
    chunk asked for. Fresh temporaries of a few MiB each call would land in the C allocator's heap (glibc raises its
    mmap threshold to the largest block freed) and stay resident after a generation; these are allocated once."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, rows: int, cols: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised [rows, cols] view of this thread's buffer (valid until its next ``take`` of that kind)."""
        key, n = (device, dtype), rows * cols
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            # a normal tensor even when the first call runs under torch.inference_mode: an inference tensor could
            # not be written in place by a later call outside it
            with torch.inference_mode(False):
                buf = self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(rows, cols)


SCRATCH = Scratch()


class DequantLinear(QuantLinear):
    """Any :class:`IntWeight` / :class:`FloatWeight` on any device: rows of w dequantized a chunk at a time (a few
    MiB, in float32, then the compute dtype, into this thread's :data:`SCRATCH`) and multiplied; the whole dense
    matrix never exists."""

    def __init__(self, w: QuantWeight, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(w.shape, _to(w.perm if isinstance(w, IntWeight) else None, device))
        self.dtype = dtype
        self.integer = isinstance(w, IntWeight)  # (w itself is not kept: its tensors are, on the device)
        self.unit = 1.0  # the scales as held times this are the weight's (a power of 2)
        if isinstance(w, IntWeight):
            self.q, self.scale, self.zero = w.q.to(device), w.scale.to(device), w.zero.to(device)
            self.bits, self.group = w.bits, w.group_size
        else:
            self.q, self.scale, self.zero = w.data.to(device), w.scale.to(device), torch.empty(0)
        # e4m3fn -> float32 through float16 bits on a CPU: ~4x faster there than torch's conversion of float8 (the two
        # NaN bytes become +-480); elsewhere torch's own conversion
        self.e4m3 = not self.integer and self.q.dtype == torch.float8_e4m3fn and device.type == "cpu"
        self.rows_per_chunk = max(1, DEQUANT_CHUNK_ELEMENTS // self.shape[1])
        self.matmul_dtype = dequant_matmul_dtype(device, dtype)

    @property
    def kernel(self) -> str:  # type: ignore[override]
        if self.matmul_dtype != self.dtype:
            return "dequantize + matmul in float32 (no bf16 units)"
        return "dequantize + matmul"

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """w[start:stop] [R, K] in the matmul dtype (columns in stored order), in :data:`SCRATCH`: the values of
        ``((q - zero) * scale).to(matmul dtype)`` computed in float32, without a float32 temporary (int4's unpacked
        bytes are one, a quarter of that size)."""
        r, k = stop - start, self.shape[1]
        w = SCRATCH.take(r, k, dtype=torch.float32, device=self.q.device)
        if self.integer:
            q = self.stored_rows(start, stop)
            w.copy_(unpack_nibbles(q) if self.bits == 4 else q)
            g = w.view(r, k // self.group, self.group)
            g.sub_(self.zero[start:stop, :, None]).mul_(self.scale[start:stop, :, None])
            if self.unit != 1.0:
                w.mul_(self.unit)
        else:
            scale = self.scale if self.scale.shape[0] == 1 else self.scale[start:stop]
            if self.e4m3:  # the byte, sign-extended, shifted and masked: float16 bits of its value * 2^-8
                h = SCRATCH.take(r, k, dtype=torch.int16, device=w.device).copy_(self.q[start:stop].view(torch.int8))
                w.copy_(h.bitwise_left_shift_(7).bitwise_and_(_E4M3_AS_F16).view(torch.float16))
                scale = scale * 256.0
            else:
                w.copy_(self.q[start:stop])
            w.mul_(scale)
        if self.matmul_dtype == torch.float32:
            return w
        return SCRATCH.take(r, k, dtype=self.matmul_dtype, device=w.device).copy_(w)

    def stored_rows(self, start: int, stop: int) -> torch.Tensor:
        """q's rows start .. stop as stored: [R, K] int8 values, or [R, K / 2] packed int4."""
        return self.q[start:stop]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        n, dtype = self.shape[0], x.dtype
        x = x.to(self.matmul_dtype)
        if self.rows_per_chunk >= n:
            return F.linear(x, self.rows(0, n)).to(dtype)
        out = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)
        for start in range(0, n, self.rows_per_chunk):
            stop = min(n, start + self.rows_per_chunk)
            out[:, start:stop] = F.linear(x, self.rows(start, stop))
        return out

    def tensors(self) -> list[torch.Tensor | None]:
        extra = [self.zero] if self.integer else []
        return [self.perm, self.q, self.scale, *extra]


class Int8Linear(DequantLinear):
    """int8, one scale per output feature, through a kernel that reads 1 byte per weight: the fused CPU kernel
    (``cpu_kernel``) up to ``FUSED_MAX_ROWS`` rows where ``_kernel`` gave it one (float32 activations; bfloat16 on
    the AVX2 build without bf16 units), else ``torch._weight_int8pack_mm`` up to its own row limit; above them the
    dequantize path (its cost is paid once for all rows). Zero points other than 128 add ``sum(x) * (128 - zero) s``."""

    def __init__(
        self, w: IntWeight, *, device: torch.device, dtype: torch.dtype, fused: cpu_kernel.Kernel | None = None
    ) -> None:
        super().__init__(w, device=device, dtype=dtype)
        self.fused = fused  # the fused CPU kernel, where _kernel chose it
        self.signed = (self.q.to(torch.int16) - 128).to(torch.int8)  # [N, K]
        self.fused_scale = self.scale[:, 0].float().contiguous() if fused is not None else None  # [N]
        self.kernel_scale = self.scale[:, 0].to(dtype).contiguous()  # [N], as torch's kernel takes it
        shift = (128 - self.zero[:, 0]) * self.scale[:, 0]  # [N]
        self.shift = shift.to(dtype) if bool((shift != 0).any()) else None
        self.max_rows = FUSED_MAX_ROWS if fused is not None else int8_kernel_max_rows(device, dtype)
        self.q = self.zero = torch.empty(0)  # the dequantize path reads the signed copy instead
        self.matmul(torch.zeros(1, self.shape[1], dtype=dtype, device=device))  # an error: prepare falls back

    @property
    def kernel(self) -> str:  # type: ignore[override]
        if self.max_rows == 0:
            return "dequantize + matmul (float32 activations)"
        return f"{self.kernel_for(1)} (<= {self.max_rows} rows), dequantize + matmul above"

    def kernel_for(self, rows: int) -> str:
        if rows > self.max_rows:
            return "dequantize + matmul"
        return self.fused.name if self.fused is not None else "_weight_int8pack_mm"

    def rows(self, start: int, stop: int) -> torch.Tensor:
        w = SCRATCH.take(stop - start, self.shape[1], dtype=self.matmul_dtype, device=self.signed.device)
        w.copy_(self.signed[start:stop]).mul_(self.kernel_scale[start:stop, None])
        return w if self.shift is None else w.add_(self.shift[start:stop, None])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return super().matmul(x)
        if self.fused is not None and self.fused_scale is not None:
            y = self.fused.linear(x, self.signed, self.fused_scale).to(x.dtype)
        else:
            y = aten._weight_int8pack_mm(x, self.signed, self.kernel_scale)
        return y if self.shift is None else y + x.sum(-1, keepdim=True) * self.shift

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.perm, self.signed, self.kernel_scale, self.fused_scale, self.shift]


class FusedLinear(DequantLinear):
    """fp8 e4m3fn, or int4 in groups of a multiple of 16, on a CPU: the fused CPU kernel (``cpu_kernel``: each
    weight decoded in registers, the matrix read once per 8 rows in the AVX-512 build, 4 in the AVX2 one) up to
    ``FUSED_MAX_ROWS`` rows, the dequantize path above. The AVX2 build holds int4 (K a multiple of 32) in tiles of 4
    rows (``cpu_kernel.tile_rows``): a one-row pass then reads each tile as one run of bytes (0.86-0.90x the time of
    rows in order on a 57344 x 4096 matrix, one row, in an A/B). int4's scales are held in float16 times a power of 2
    (``half_scales``: exact for a checkpoint's bfloat16 or float16 scales; others are rounded to 11 significant bits,
    said in the log) and its zero points in uint8 (whole numbers, which ``prepare`` checks): 3 bytes per group, not
    8 in float32 (a 14336 x 4096 matrix in groups of 32: 34.9 MB, not 44.0: 0.30x its bfloat16 bytes)."""

    def __init__(self, w: QuantWeight, fused: cpu_kernel.Kernel, *, device: torch.device, dtype: torch.dtype):
        super().__init__(w, device=device, dtype=dtype)
        self.fused = fused
        if self.integer:
            exact = self.scale
            self.scale, self.unit = half_scales(exact)
            self.zero = self.zero.to(torch.uint8)
            if not same_values(self.scale.float() * self.unit, exact):
                note(
                    "int4 scales with more than 11 significant bits are rounded to 11 for the fused CPU kernel (each "
                    "by at most 2^-12 of itself; a checkpoint's bfloat16 or float16 scales are kept exactly)",
                    level=logging.WARNING,
                )
        self.kernel_scale = self.scale if self.integer else self.scale.reshape(-1)  # [N, K / G]; fp8: [N] or [1]
        self.tiled = self.integer and fused.simd == 256 and self.shape[1] % 32 == 0
        if self.tiled:
            self.q = cpu_kernel.tile_rows(self.q)  # [N rounded up to 4, K / 2]

    @property
    def kernel(self) -> str:  # type: ignore[override]
        return f"{self.fused.name} (<= {FUSED_MAX_ROWS} rows), dequantize + matmul above"

    def kernel_for(self, rows: int) -> str:
        return self.fused.name if rows <= FUSED_MAX_ROWS else "dequantize + matmul"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FUSED_MAX_ROWS:
            return super().matmul(x)
        zero = self.zero if self.integer else None
        y = self.fused.linear(x, self.q, self.kernel_scale, zero=zero, tiled=self.tiled)
        return (y if self.unit == 1.0 else y.mul_(self.unit)).to(x.dtype)

    def stored_rows(self, start: int, stop: int) -> torch.Tensor:
        return cpu_kernel.untile_rows(self.q, start, stop) if self.tiled else self.q[start:stop]


class Int4Linear(QuantLinear):
    """int4 in groups: torch's int4 kernels (tinygemm on CUDA, its CPU port elsewhere), which compute
    ``w = (q - 8) * scale + z`` with a float z, so z = (8 - zero) * scale; the weight lives only in the kernel's
    own (device-specific) packing."""

    def __init__(self, w: IntWeight, *, device: torch.device, dtype: torch.dtype, group: int) -> None:
        super().__init__(w.shape, _to(w.perm, device))
        n, k = w.shape
        repeat = w.group_size // group
        scale, zero = w.scale.repeat_interleave(repeat, 1), w.zero.repeat_interleave(repeat, 1)  # [N, K / Gk]
        self.scale_zeros = torch.stack((scale.t(), ((8 - zero) * scale).t()), -1).to(dtype).contiguous().to(device)
        self.group, self.cuda = group, device.type == "cuda"
        if self.cuda:
            v = w.values().to(device)
            tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            self.packed = aten._convert_weight_to_int4pack((v[:, ::2] << 4 | v[:, 1::2]).contiguous(), tiles)
            self.kernel = "_weight_int4pack_mm (tinygemm)"
        else:
            chunks = [w.values()[i : i + 1024].to(torch.int32) for i in range(0, n, 1024)]  # 1024: whole blocks
            self.packed = torch.cat([aten._convert_weight_to_int4pack_for_cpu(c, 1) for c in chunks]).to(device)
            self.kernel = "_weight_int4pack_mm_for_cpu"
        self.matmul(torch.zeros(1, k, dtype=dtype, device=device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            return aten._weight_int4pack_mm(x, self.packed, self.group, self.scale_zeros)
        return aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zeros)

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.perm, self.packed, self.scale_zeros]


class Fp8Linear(QuantLinear):
    """fp8 weights and activations on FP8 tensor cores (``torch._scaled_mm``): the input quantized per token
    (dynamic) or with the stored ``input_scale`` (static), as the scheme says."""

    kernel = "_scaled_mm (fp8 activations)"

    def __init__(self, w: FloatWeight, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(w.shape, None)
        self.dtype = dtype
        self.data = w.data.to(device)  # [N, K]; .t() is the column-major [K, N] _scaled_mm takes
        self.scale_b = w.scale.reshape(1, -1).expand(1, w.shape[0]).float().contiguous().to(device)  # [1, N]
        self.input_scale = None if w.input_scale is None else w.input_scale.float().to(device)
        assert w.activations is not None
        self.static = not w.activations.dynamic
        self.matmul(torch.zeros(16, w.shape[1], dtype=dtype, device=device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.static and self.input_scale is not None:
            scale_a = self.input_scale.expand(x.shape[0], 1).contiguous()
        else:
            scale_a = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / _FP8_MAX  # [M, 1]
        xq = (x.float() / scale_a).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        return aten._scaled_mm(xq, self.data.t(), scale_a=scale_a, scale_b=self.scale_b, out_dtype=self.dtype)

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.data, self.scale_b, self.input_scale]


def prepare(
    w: QuantWeight, *, device: torch.device, dtype: torch.dtype, cpu_mode: str | None = None, role: str = "experts"
) -> QuantLinear:
    """The form ``w`` runs in on ``device``: a kernel's where one runs for it (tried here, once per matrix), else
    :class:`DequantLinear`. ``cpu_mode``: which build of the fused CPU kernel (default: ``$MIXSERVE_CPU_KERNEL``).
    Each choice is logged once per process, per ``role`` (what the matrix is: experts, attention)."""
    fused = cpu_kernel.kernel(cpu_mode) if device.type == "cpu" else None
    try:
        linear = _kernel(w, device, dtype, fused, role)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError) as e:
        log.info("%s %s: no kernel on %s (%s); dequantize + matmul", _kind(w), w.shape, device, str(e)[:160])
        linear = None
    if linear is None:
        linear = DequantLinear(w, device=device, dtype=dtype)
        if isinstance(w, FloatWeight) and device.type == "cpu":
            mode = cpu_mode or cpu_kernel.mode()
            note(
                f"fp8 {role} on the CPU without the fused CPU kernel ({cpu_kernel.ENV}={mode}, or no C compiler) "
                "dequantize every call (30-40 ms per 14336 x 4096 matrix on a 2-core CPU, whatever the rows; "
                "a bfloat16 matmul of it takes ~9 ms at one row)",
                level=logging.WARNING,
            )
    linear.kind = _kind(w)
    note(f"{_kind(w)} {role} on {device.type} ({str(dtype).removeprefix('torch.')}): {linear.kernel}")
    return linear


def _kernel(
    w: QuantWeight, device: torch.device, dtype: torch.dtype, fused: cpu_kernel.Kernel | None, role: str
) -> QuantLinear | None:
    if isinstance(w, IntWeight):
        # the fused kernel where it beats torch's (fused_runs_int); float32 activations on a CPU never run torch's
        # int8 / int4 kernels, which take 19-70x (int8) and 1.4-13x (int4) longer there: dequantize + matmul instead
        own = fused if fused is not None and fused_runs_int(dtype, fused.simd) else None
        group = int4_kernel_group(w.group_size)
        if w.bits == 4 and own is not None and w.group_size % 16 == 0 and _whole_bytes(w.zero):
            return FusedLinear(w, own, device=device, dtype=dtype)
        if w.bits == 4 and device.type == "cpu" and dtype == torch.float32:
            return None
        if w.bits == 4 and group is not None and (device.type == "cpu" or dtype == torch.bfloat16):
            return Int4Linear(w, device=device, dtype=dtype, group=group)
        if w.bits == 8 and w.group_size == w.shape[1]:
            return Int8Linear(w, device=device, dtype=dtype, fused=own)
        return None
    if w.activations is not None:
        if fp8_matmul_device(device) and dtype in (torch.bfloat16, torch.float16):
            return Fp8Linear(w, device=device, dtype=dtype)
        note(f"fp8 {role} on {device.type}: the scheme quantizes activations, but this device has no fp8 matmul; "
             "running weight-only")  # fmt: skip
    return (
        None
        if fused is None or w.data.dtype != torch.float8_e4m3fn
        else FusedLinear(w, fused, device=device, dtype=dtype)
    )


def _whole_bytes(t: torch.Tensor) -> bool:
    """Every value a whole number in 0..255 (zero points the fused kernel holds as uint8)."""
    return bool(((t >= 0) & (t <= 255) & (t == t.round())).all())


def _kind(w: QuantWeight) -> str:
    if isinstance(w, FloatWeight):
        return "fp8"
    return f"int{w.bits}" + ("" if w.group_size == w.shape[1] else f" g{w.group_size}")


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
