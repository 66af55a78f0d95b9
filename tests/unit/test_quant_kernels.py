"""Every way a quantized matrix runs (the fused CPU kernel in each build, torch's int8 / int4 kernels, dequantize +
matmul in chunks) gives ``x @ w.T`` of its exact float32 dequantization; the kernel is chosen by the device, the
activation dtype and the rows an expert gets; a quantized expert shard equals a dense shard of the dequantized
weights."""

from __future__ import annotations

import logging

import pytest
import torch

import workers.quant.linear as linear
from cluster.checkpoint.quant.quantize import quantize
from cluster.checkpoint.quant.weights import FloatWeight, IntWeight, half_scales, pack_nibbles
from cluster.config.dtype import FAST_BF16_ENV, cpu_has_fast_bf16
from workers.expert import ExpertShard
from workers.quant import cpu_kernel, kernels
from workers.quant.kernels import fused_runs_int
from workers.quant.linear import DequantLinear, FusedLinear, Int4Linear, Int8Linear, prepare

CPU = torch.device("cpu")


def int_weight(n: int, k: int, *, bits: int, group: int, seed: int = 0, sym: bool = False, perm: bool = False):
    """Random values, zero points and scales, the scales bfloat16 numbers (what a checkpoint stores)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).bfloat16().float()
    zero = torch.randint(0, 2**bits, scale.shape, generator=g).float()
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    order = torch.randperm(k, generator=g) if perm else None
    q = pack_nibbles(values) if bits == 4 else values
    return IntWeight(bits, q.contiguous(), scale, zero, group, order)


def check(lin, w, rows: int, *, dtype=torch.float32, seed: int = 1):
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
    want = x.double() @ w.dequantize().double().t()
    got = lin(x)
    assert got.shape == (rows, w.shape[0]) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), (rows, err)


def every_fp8_byte(n: int, k: int) -> FloatWeight:
    """An fp8 weight [n, k] whose bytes run through all 254 finite e4m3fn values (subnormals, both zeros)."""
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    data = finite.repeat(n * k // 254 + 1)[: n * k].view(torch.float8_e4m3fn).reshape(n, k)
    return FloatWeight(data, torch.rand(n, 1, generator=torch.Generator().manual_seed(5)) * 0.01)


def fused_name(mode: str) -> str | None:
    k = cpu_kernel.kernel(mode)
    return None if k is None else k.name


def int_kernel(mode: str, dtype: torch.dtype) -> str | None:
    """The fused kernel int8 / int4 weights run under ``dtype`` in build ``mode``: any build for float32; for
    bfloat16 only the AVX2 one on a CPU without bf16 units (measured faster than torch's kernels there only)."""
    k = cpu_kernel.kernel(mode)
    if k is None or dtype == torch.float32:
        return None if k is None else k.name
    return k.name if k.simd == 256 and not cpu_has_fast_bf16() else None


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_and_dequantize_paths(cpu_kernel_mode, rows, sym, dtype):
    w = int_weight(96, 128, bits=8, group=128, sym=sym)
    lin = prepare(w, device=CPU, dtype=dtype)
    assert isinstance(lin, Int8Linear)
    lin.max_rows = 8  # both paths, whatever this CPU would choose
    fused = int_kernel(cpu_kernel_mode, dtype)
    if rows > 8:
        assert lin.kernel_for(rows) == "dequantize + matmul"
    else:
        assert lin.kernel_for(rows) == (fused or "_weight_int8pack_mm")
    assert (lin.shift is None) == sym  # zero points other than 128 add sum(x) * (128 - zero) * scale
    check(lin, w, rows, dtype=dtype)


def test_int8_row_limit_follows_the_kernel_cpu_and_dtype(cpu_kernel_mode, fast_bf16):
    """The measured crossovers (workers/quant/kernels.py). float32 activations: the fused kernel up to 32 rows, or
    dequantize + matmul where it is off (torch's kernel is far slower in float32). bfloat16: torch's kernel up to 8
    rows on a CPU with bf16 units, up to 32 without them, where the AVX2 build's fused kernel takes them instead."""
    w = int_weight(96, 128, bits=8, group=128)
    fused = fused_name(cpu_kernel_mode)
    f32, bf16 = (prepare(w, device=CPU, dtype=d) for d in (torch.float32, torch.bfloat16))
    assert f32.kernel_for(1) == (fused or "dequantize + matmul")
    assert f32.kernel_for(32) == (fused or "dequantize + matmul")
    assert f32.kernel_for(33) == "dequantize + matmul"
    own = int_kernel(cpu_kernel_mode, torch.bfloat16)  # the AVX2 build without bf16 units
    for rows in (1, 2, 3, 8, 9, 32):
        torchs = "_weight_int8pack_mm" if rows <= (8 if fast_bf16 else 32) else "dequantize + matmul"
        assert bf16.kernel_for(rows) == (own or torchs)
    assert bf16.kernel_for(33) == "dequantize + matmul"


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize(("k", "group"), [(128, 32), (256, 128), (512, 512)])  # 512: per channel, kernel groups 256
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernels(cpu_kernel_mode, rows, k, group, dtype):
    """bfloat16: torch's int4 kernel, but the AVX2 build's fused kernel on a CPU without bf16 units; float32: the
    fused kernel (torch's is slow for float32 activations on a CPU), dequantize + matmul above 32 rows, and dequantize
    + matmul for every row count where the fused one is off."""
    w = int_weight(80, k, bits=4, group=group)
    lin = prepare(w, device=CPU, dtype=dtype)
    fused = int_kernel(cpu_kernel_mode, dtype)
    if dtype == torch.bfloat16 and fused is None:
        assert isinstance(lin, Int4Linear) and lin.group == min(group, 256)
        assert lin.kernel_for(rows) == "_weight_int4pack_mm_for_cpu"
    elif fused is None:
        assert type(lin) is DequantLinear and lin.kernel_for(rows) == "dequantize + matmul"
    else:
        assert isinstance(lin, FusedLinear)
        assert lin.kernel_for(rows) == (fused if rows <= 32 else "dequantize + matmul")
    check(lin, w, rows, dtype=dtype)


@pytest.mark.parametrize("size", [1.0, 1e-9])
@pytest.mark.parametrize("mode", ["auto", "portable"])
def test_fused_int4_holds_three_bytes_per_group_and_the_scales_exactly(monkeypatch, mode, size):
    """The fused kernel's int4 keeps float16 scales (times a power of 2) and uint8 zero points, 3 bytes per group
    where float32 took 8, and its products equal the exact dequantization's at 1, 2 and 33 rows (the kernel, and
    dequantize + matmul above 32 rows), also for bfloat16 scales of 1e-9 (below float16's range: held times 2^-50),
    there within 1e-5 of each output's own size."""
    monkeypatch.setenv(cpu_kernel.ENV, mode)
    w = int_weight(64, 128, bits=4, group=32)
    w = IntWeight(4, w.q, (w.scale * size).bfloat16().float(), w.zero, 32)
    lin = prepare(w, device=CPU, dtype=torch.float32)
    assert isinstance(lin, FusedLinear) and lin.scale.dtype == torch.float16 and lin.zero.dtype == torch.uint8
    assert torch.equal(lin.scale.float() * lin.unit, w.scale) and torch.equal(lin.zero.float(), w.zero)
    assert (lin.unit == 1.0) == (size == 1.0) and lin.nbytes() == 64 * 64 + 64 * 4 * 3
    for rows in (1, 2, 33):
        check(lin, w, rows)
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        want = x.double() @ w.dequantize().double().t()
        terms = x.double().abs() @ w.dequantize().double().abs().t()
        assert ((lin(x).double() - want).abs() <= 1e-5 * terms).all(), rows


def test_half_scales_keep_each_scale_apart_from_a_nan_or_infinite_one():
    """A NaN or infinite scale (a group whose weights are so) stays so and sets no unit: the other scales come back
    exactly (bfloat16 numbers 2^27 apart, so a unit is needed)."""
    for bad in (float("nan"), float("inf")):
        scale = torch.tensor([bad, 1e5, 1e-3]).bfloat16().float()
        h, unit = half_scales(scale)
        held = h.float() * unit
        assert unit == 4.0 and torch.equal(held[1:], scale[1:])
        assert held[0].isnan() if bad != bad else held[0].isinf()


def test_int4_scales_of_more_bits_are_rounded_and_said(caplog, monkeypatch):
    """float32 scales of 24 bits are rounded to 11 for the fused kernel, each by at most 2^-12 of itself, and the log
    says so; zero points that are not whole numbers keep float32 and dequantize + matmul."""
    w = int_weight(64, 128, bits=4, group=32)
    w = IntWeight(4, w.q, w.scale * (1 + 2**-20), w.zero, 32)  # 24 significant bits
    monkeypatch.setattr(kernels, "_LOGGED", set())  # (each message is logged once per process)
    with caplog.at_level(logging.WARNING, logger="mixserve.quant"):
        lin = prepare(w, device=CPU, dtype=torch.float32, cpu_mode="auto")
    assert isinstance(lin, FusedLinear)
    held = lin.scale.double() * lin.unit
    assert ((held - w.scale.double()).abs() <= 2**-12 * w.scale.double()).all() and not torch.equal(held, w.scale)
    assert "rounded to 11 for the fused CPU kernel" in caplog.text
    x = torch.randn(3, 128)
    rounded = IntWeight(4, w.q, held.float(), w.zero, 32).dequantize().double()
    assert torch.allclose(lin(x).double(), x.double() @ rounded.t(), rtol=0, atol=1e-5)
    halves = IntWeight(4, w.q, w.scale, w.zero + 0.5, 32)
    assert type(prepare(halves, device=CPU, dtype=torch.float32, cpu_mode="auto")) is DequantLinear


@pytest.mark.parametrize("rows", [1, 9, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", ["channel", "tensor"])
def test_fp8_on_a_cpu(cpu_kernel_mode, rows, dtype, scale):
    """fp8 weights on a CPU: the fused kernel up to 32 rows and dequantize + matmul above, or dequantize + matmul
    only where the kernel is off; every finite e4m3fn byte value, per-channel and per-tensor scales."""
    w = every_fp8_byte(72, 136)
    if scale == "tensor":
        w = FloatWeight(w.data, torch.tensor([[0.003]]))
    lin = prepare(w, device=CPU, dtype=dtype)
    fused = fused_name(cpu_kernel_mode)
    assert type(lin) is (DequantLinear if fused is None else FusedLinear)
    if fused is None:
        assert lin.kernel_for(rows) == lin.kernel  # dequantize + matmul (in float32 without bf16 units)
    else:
        assert lin.kernel_for(rows) == (fused if rows <= 32 else "dequantize + matmul")
    check(lin, w, rows, dtype=dtype)


def test_int4_packing_in_row_chunks_equals_one_packing():
    """Rows are packed 1024 at a time (whole blocks of the kernel's layout), never one int32 copy of the matrix."""
    w = int_weight(2112, 64, bits=4, group=32)
    lin = Int4Linear(w, device=CPU, dtype=torch.float32, group=32)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.values().to(torch.int32), 1)
    assert torch.equal(lin.packed, whole)
    check(lin, w, 5)


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_order_columns(cpu_kernel_mode, kind, dtype):
    """GPTQ's act order: stored columns are input features perm[k]; every kernel gathers x's columns to match."""
    w = int_weight(64, 128, bits=4 if kind == "int4" else 8, group=32 if kind == "int4" else 128, perm=True)
    lin = prepare(w, device=CPU, dtype=dtype)
    assert lin.perm is not None
    check(lin, w, 3, dtype=dtype)


@pytest.mark.parametrize(
    "w",
    [
        int_weight(64, 96, bits=4, group=16),  # no int4 kernel takes groups of 16
        int_weight(64, 128, bits=8, group=32),  # grouped int8: no kernel
        every_fp8_byte(64, 128),
        FloatWeight(every_fp8_byte(64, 128).data, torch.tensor([[0.003]])),
    ],
    ids=["int4-g16", "int8-g32", "fp8-channel", "fp8-tensor"],
)
@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_path(monkeypatch, w, rows, dtype):
    monkeypatch.setenv(cpu_kernel.ENV, "off")  # fp8: the dequantize path only
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_ELEMENTS", 1000)  # several row chunks
    lin = prepare(w, device=CPU, dtype=dtype)
    assert type(lin) is DequantLinear and lin.rows_per_chunk < w.shape[0]
    check(lin, w, rows, dtype=dtype)


@pytest.mark.parametrize("kind", ["fp8", "int4-g16"])
def test_dequantize_path_multiplies_bf16_in_float32_on_a_cpu_without_bf16_units(monkeypatch, fast_bf16, kind):
    """bfloat16 activations: the chunks are multiplied in float32 where the CPU has no bf16 units (its bfloat16
    matmul is emulated), in bfloat16 where it has them; the output is bfloat16 and right either way."""
    monkeypatch.setenv(cpu_kernel.ENV, "off")  # fp8: the dequantize path only
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_ELEMENTS", 1000)
    w = int_weight(64, 96, bits=4, group=16) if kind != "fp8" else every_fp8_byte(64, 128)
    lin = prepare(w, device=CPU, dtype=torch.bfloat16)
    assert type(lin) is DequantLinear
    assert lin.matmul_dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert lin.kernel == ("dequantize + matmul" if fast_bf16 else "dequantize + matmul in float32 (no bf16 units)")
    for rows in (1, 17):
        check(lin, w, rows, dtype=torch.bfloat16)


def test_dequantize_chunks_reuse_one_buffer_per_thread(monkeypatch):
    """Every chunk of every call dequantizes into the same per-thread buffer (no allocation per call that the C
    heap would keep), and two matrices taking turns, or two threads, do not disturb each other's results."""
    import threading

    monkeypatch.setenv(cpu_kernel.ENV, "off")  # int4 g16 in float32: the dequantize path only
    monkeypatch.setattr(linear, "DEQUANT_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(linear, "SCRATCH", linear.Scratch())
    a, b = int_weight(64, 96, bits=4, group=16, seed=1), int_weight(40, 128, bits=8, group=32, seed=2)
    la, lb = (prepare(w, device=CPU, dtype=torch.float32) for w in (a, b))
    assert (la.rows_per_chunk * 96, lb.rows_per_chunk * 128) == (960, 896)  # b's chunks fit a's buffer
    check(la, a, 5)
    buf = linear.SCRATCH.buffers[(CPU, torch.float32)]
    assert buf.numel() == 960
    for _ in range(3):
        check(lb, b, 7)
        check(la, a, 5)
    assert list(linear.SCRATCH.buffers.items()) == [((CPU, torch.float32), buf)]  # the same one, never replaced
    with torch.inference_mode():  # buffers made under inference mode still serve calls outside it, and back
        fresh = prepare(int_weight(64, 496, bits=4, group=16, seed=3), device=CPU, dtype=torch.float32)
        fresh(torch.randn(2, 496))  # grows the float32 buffer (2 x 496 > 960) inside inference mode
    check(la, a, 5)
    with torch.inference_mode():
        check(lb, b, 7)
    other: list = []
    t = threading.Thread(target=lambda: (check(la, a, 3), other.append(linear.SCRATCH.buffers)))
    t.start()
    t.join()
    assert other and other[0] is not linear.SCRATCH.buffers  # the thread's own buffers


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_bf16_kernels(kind):
    w = int_weight(64, 128, bits=4 if kind == "int4" else 8, group=32 if kind == "int4" else 128)
    lin = prepare(w, device=CPU, dtype=torch.bfloat16)
    assert type(lin) is not DequantLinear
    for rows in (1, 20):
        check(lin, w, rows, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantized_shard_equals_a_dense_shard_of_its_dequantization(kind):
    g = torch.Generator().manual_seed(3)
    D, Fi, E = 64, 96, 4
    dense = {e: tuple(torch.randn(*s, generator=g) * 0.3 for s in ((Fi, D), (D, Fi), (Fi, D))) for e in range(E)}
    q = {e: tuple(quantize(t, kind) for t in ws) for e, ws in dense.items()}
    from workers.quant.experts import QuantExpert

    shard = ExpertShard.quantized(
        {0: {e: QuantExpert(*q[e], device=CPU, dtype=torch.float32) for e in range(E)}}, num_experts=E
    )
    reference = ExpertShard({(0, e): tuple(t.dequantize() for t in q[e]) for e in range(E)}, num_experts=E)
    assert shard.nbytes() < 0.3 * reference.nbytes()  # against float32
    x = torch.randn(12, D, generator=g)
    rows = torch.arange(12).repeat(2)
    experts, order = torch.randint(0, E, (24,), generator=g).sort()
    weights = torch.rand(24, generator=g)
    got = shard.run(0, x, rows[order], experts, weights)
    want = reference.run(0, x, rows[order], experts, weights)
    # int4 on the fused kernel's AVX2 build sums q x over a group and applies its scale and zero once, which in float32
    # rounds up to ~1e-5 of the output's scale (where x's mean is large): 10x what a dense float32 matmul rounds
    tol = 1e-4 if kind == "int4" else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("dtype", "simd", "units", "fused"),
    [
        (torch.float32, 512, True, True),  # torch's int kernels take 19-70x longer in float32 on a CPU
        (torch.float32, 0, False, True),
        (torch.bfloat16, 256, False, True),  # the AVX2 build beat torch's at 1-32 rows there
        (torch.bfloat16, 256, True, False),  # bf16 units: torch's kernels
        (torch.bfloat16, 512, False, False),  # the AVX-512 build lost to torch's int8 (4-32 rows) and int4 (1 row)
        (torch.bfloat16, 0, False, False),  # the portable loop
        (torch.float16, 256, False, False),
    ],
)
def test_which_activations_run_int_weights_on_the_fused_kernel(monkeypatch, dtype, simd, units, fused):
    monkeypatch.setenv(FAST_BF16_ENV, "1" if units else "0")
    assert fused_runs_int(dtype, simd) is fused
