"""The fused CPU kernel (workers/quant/cpu_kernel.c), every build: every float8 byte decodes to torch's own value of
it, and every product equals ``x @ w.T`` of the weight's float64 dequantization, for any shape (row and column
tails, more than 8 rows, one or two threads); the build is cached per source and host and fails soft."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.checkpoint.quant.weights import pack_nibbles
from workers.quant import cpu_kernel

BUILDS = ["auto", "avx2", "portable"]
GROUPS = [16, 32, 64, 128, 48, 96, 512]  # AVX2: unrolled for 16-128; 48, 96 and 512 take the general loops


@pytest.fixture(params=BUILDS, scope="module")
def build(request) -> cpu_kernel.Kernel:
    k = cpu_kernel.kernel(request.param)
    assert k is not None, "this machine has a C compiler: the kernel must build"
    return k


def test_builds_are_the_ones_asked_for():
    """auto: AVX-512 (F, BW, VL and F16C) where the CPU has it, else AVX2 (with FMA and F16C), else the portable
    loop (CI hosts have been of both SIMD kinds); avx2: AVX2 on either kind of host, so both SIMD builds run where
    AVX-512 is; portable: never SIMD."""
    flags = Path("/proc/cpuinfo").read_text()
    avx512 = all(f in flags for f in (" avx512f", " avx512bw", " avx512vl", " f16c"))
    avx2 = all(f in flags for f in (" avx2", " fma", " f16c"))
    assert cpu_kernel.kernel("auto").simd == (512 if avx512 else 256 if avx2 else 0)  # type: ignore[union-attr]
    assert cpu_kernel.kernel("avx2").simd == (256 if avx2 else 0)  # type: ignore[union-attr]
    assert cpu_kernel.kernel("portable").simd == 0  # type: ignore[union-attr]
    assert cpu_kernel.kernel("off") is None


def test_every_float8_byte_decodes_to_torchs_value(build):
    """x one-hot: y[m, n] = w[n, m] * scale, a single product, so it must equal torch's float8 -> float32 value
    times the scale exactly, for all 254 finite e4m3fn bytes (subnormals and both zeros included)."""
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    w = finite.view(torch.float8_e4m3fn).reshape(2, 127)  # [N 2, K 127]: a column tail after whole blocks of 8 or 16
    eye = torch.eye(127)
    for scale in (torch.tensor([0.75, 3.0]), torch.tensor([0.375])):
        got = build.linear(eye, w, scale)  # [127, 2]
        want = (w.float() * scale.reshape(-1, 1)).t()
        assert torch.equal(got, want)


def _check(got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
    """Each output within 1e-5 of float64, relative to its own sum of |x| times ``magnitude`` (default |dense|): what
    float32 rounding scales with. An output that cancels to near 0 keeps the rounding of its terms (hypothesis found
    int8 weights at k = 50 whose output of 2.3 carried 3.2e-5 from terms of up to 300); int4 passes s (q + z), the
    terms its per-group sums s (sum of q x) - s z (sum of x) cancel."""
    want = x.double() @ dense.t()
    terms = x.double().abs() @ (dense.abs() if magnitude is None else magnitude.double()).t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got.double() - want).abs()
    assert (err <= 1e-5 * terms.clamp(min=1.0)).all(), (err - 1e-5 * terms.clamp(min=1.0)).max().item()


def _groups(n: int, groups: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int4's operands per group as the kernel takes them: float16 scales in [0.001, 0.021) and uint8 zeros 0..15."""
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).half()
    return scale, torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)


def _int4(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit values [N, K] with scale and zero [N, K / G]: the dense weights (q - z) s, and s (q + z) for _check."""
    group = values.shape[1] // scale.shape[1]
    s, z = scale.double().repeat_interleave(group, 1), zero.double().repeat_interleave(group, 1)
    return (values.double() - z) * s, (values.double() + z) * s


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 19), n=st.integers(1, 37), k=st.integers(1, 70), seed=st.integers(0, 2**16),
       per_row=st.booleans())  # fmt: skip
@pytest.mark.parametrize("mode", BUILDS)
def test_one_and_two_byte_weights_match_their_dequantization(mode, m, n, k, seed, per_row):
    build = cpu_kernel.kernel(mode)
    assert build is not None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    scale = torch.rand(n if per_row else 1, generator=g) + 0.01
    fp8 = (torch.randn(n, k, generator=g) * 40).to(torch.float8_e4m3fn)
    i8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    bf16 = torch.randn(n, k, generator=g).bfloat16()
    for w in (fp8, i8, bf16):
        _check(build.linear(x, w, scale), x, w.double() * scale.double().reshape(-1, 1))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 19), n=st.integers(1, 37), groups=st.integers(1, 10), group=st.sampled_from(GROUPS),
       seed=st.integers(0, 2**16))  # fmt: skip
@pytest.mark.parametrize("mode", BUILDS)
def test_int4_groups_match_their_dequantization(mode, m, n, groups, group, seed):
    build = cpu_kernel.kernel(mode)
    assert build is not None
    g = torch.Generator().manual_seed(seed)
    k = groups * group
    values = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, zero = _groups(n, groups, g)
    x = torch.randn(m, k, generator=g)
    dense, magnitude = _int4(values, scale, zero)
    _check(build.linear(x, pack_nibbles(values), scale, zero=zero), x, dense, magnitude)


@pytest.mark.parametrize("rows", [1, 2])
def test_every_finite_float16_scale_is_read_to_the_bit(build, rows):
    """Row n of w has the scale whose float16 bits are n (63488 finite ones: zeros, subnormals, normals, both
    signs), q = 1, z = 0, and x is one-hot, so each output is its scale exactly, at 1 and 2 rows of float32 and
    bfloat16 x (the one- and two-row integer paths, and the float loops)."""
    bits = torch.arange(2**16, dtype=torch.int32)
    bits = bits[(bits >> 10) & 31 != 31]  # not an infinity or NaN
    scale = bits.to(torch.int16).view(torch.float16)[:, None]  # [N, 1 group of 32]
    values = torch.ones(len(bits), 32, dtype=torch.uint8)
    x = torch.zeros(rows, 32)
    x[0, 5] = 1.0
    x[1:, 30] = 1.0  # the second row's one in another column
    for dtype in (torch.float32, torch.bfloat16):
        got = build.linear(x.to(dtype), pack_nibbles(values), scale, zero=torch.zeros_like(scale, dtype=torch.uint8))
        assert torch.equal(got, scale.float().t().expand(rows, -1)), dtype


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int4_zero_points_up_to_255_with_scales_of_every_kind(build, rows):
    """Row i's scale is one kind of float16 (a subnormal from 2^-24 up, the smallest and largest normals, 1, one bit
    above 1) in every group, and its zero points run up to 255: each output within 1e-5 of float64 relative to its
    own sum of |x| s (q + z) (no floor: a row of tiny scales keeps its own size), at 1, 2 and 5 rows of float32 and
    bfloat16 x. 9 groups: the one-row paths take the zero points' term 8 groups at a time, then one."""
    bits = [0x0001, 0x0003, 0x03FF, 0x0400, 0x3555, 0x3C00, 0x3C01, 0x7BFF, 0x2E66]
    scale = torch.tensor(bits, dtype=torch.int16).view(torch.float16)[:, None].expand(9, 9).contiguous()
    zero = torch.tensor([0, 1, 8, 15, 16, 100, 200, 255, 128], dtype=torch.uint8)
    zero = torch.stack([zero.roll(i) for i in range(9)])  # [9 rows, 9 groups]
    g = torch.Generator().manual_seed(rows)
    values = torch.randint(0, 16, (9, 288), generator=g, dtype=torch.uint8)
    dense, magnitude = _int4(values, scale, zero)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, 288, generator=g).to(dtype)
        got = build.linear(x, pack_nibbles(values), scale, zero=zero).double()
        terms = x.double().abs() @ magnitude.t()
        assert ((got - x.double() @ dense.t()).abs() <= 1e-5 * terms).all(), dtype


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_past_64_groups(build, rows, dtype):
    """67 groups of 32 (Mixtral's matrices have 112-448): the one-row and two-row paths widen the scales and take
    the zero points' term 64 groups at a time, so the second window and its last 3 groups are checked too; 5 weight
    rows (a partial tile)."""
    g = torch.Generator().manual_seed(rows)
    values = torch.randint(0, 16, (5, 67 * 32), generator=g, dtype=torch.uint8)
    scale, zero = _groups(5, 67, g)
    x = torch.randn(rows, 67 * 32, generator=g).to(dtype)
    _check(build.linear(x, pack_nibbles(values), scale, zero=zero), x, *_int4(values, scale, zero))


@pytest.mark.parametrize("m", range(1, 10))
def test_every_tile_shape(build, m):
    """Each row count from 1 to 9 (every tile of both SIMD builds: 4 weight rows x 1-4 rows of x, 2 x 1-8, and a
    second pass over x), each kind (int4 in every group size of GROUPS), 7 weight rows (a partial tile) and a column
    tail, against float64."""
    g = torch.Generator().manual_seed(m)
    x, k = torch.randn(m, 200, generator=g), 200  # 200 = 12 x 16 + 8: a tail in every kind but int4
    scale = torch.rand(7, generator=g) + 0.01
    fp8 = (torch.randn(7, k, generator=g) * 40).to(torch.float8_e4m3fn)
    i8 = torch.randint(-128, 128, (7, k), generator=g, dtype=torch.int8)
    bf16 = torch.randn(7, k, generator=g).bfloat16()
    for w in (fp8, i8, bf16):
        _check(build.linear(x, w, scale), x, w.double() * scale.double().reshape(-1, 1))
    for group in GROUPS:  # int4: 9 groups (K a multiple of 16; the one-row paths take the zero points 8 at a time)
        x4, k4 = torch.randn(m, 9 * group, generator=g), 9 * group
        values = torch.randint(0, 16, (7, k4), generator=g, dtype=torch.uint8)
        groups, zero = _groups(7, 9, g)
        _check(build.linear(x4, pack_nibbles(values), groups, zero=zero), x4, *_int4(values, groups, zero))


@pytest.mark.parametrize("size", [1e-33, 1e-28, 1.0, 1e30])
@pytest.mark.parametrize("group", [32, 512])
def test_int4_at_one_row_holds_its_precision_at_any_scale(build, size, group):
    """One row of x, which the AVX2 build multiplies in fixed point per block of columns (2^-20 of the block's largest
    |x|): within 1e-5 of float64 relative to the largest output at every scale (1e-33 is below the fixed point's range
    and takes the float loop), and where one column holds a value 1000x the others (a block's largest) too."""
    g = torch.Generator().manual_seed(group)
    values = torch.randint(0, 16, (9, 2 * group), generator=g, dtype=torch.uint8)
    scale, zero = _groups(9, 2, g)
    dense = _int4(values, scale, zero)[0]
    for outlier in (1.0, 1000.0):
        x = torch.randn(1, 2 * group, generator=g) * size
        x[0, 7] *= outlier
        want = x.double() @ dense.t()
        got = build.linear(x, pack_nibbles(values), scale, zero=zero).double()
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize(("dtype", "value"), [(torch.float32, 1 - 2**-24), (torch.bfloat16, 1 - 2**-8)])
@pytest.mark.parametrize("group", [128, 256, 512])
def test_int4_at_one_row_sums_the_largest_values_exactly(build, group, dtype, value):
    """The one-row path adds up to 128 columns' integer products in one 32-bit lane (blocks of 256 columns; the 4
    weight rows' lanes summed across): every q = 15 and every x just below a power of 2 (float32 x: X = 2^20 in three
    digits, the most a block holds) is its largest sum, 15 * 2^20 * 128 < 2^31; an overflow there would be off by
    2^32 u, far outside 1e-6. bfloat16 x (two digits) the same way, at 1 - 2^-8."""
    k = 2 * group
    values = torch.full((5, k), 15, dtype=torch.uint8)
    scale, zero = torch.ones(5, 2, dtype=torch.float16), torch.zeros(5, 2, dtype=torch.uint8)
    x = torch.full((1, k), value, dtype=torch.float64).to(dtype)
    assert x[0, 0].item() == value  # exact in its dtype
    want = x.double().sum() * 15
    got = build.linear(x, pack_nibbles(values), scale, zero=zero).double()[0]
    assert ((got - want).abs() <= 1e-6 * want).all(), (got, want)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 96, 128, 512])
def test_int4_at_one_or_two_rows_of_bfloat16_hold_each_x_to_its_block(build, group, dtype, rows):
    """A bfloat16 row of x holds 8 significant bits, so at one or two rows the AVX2 build multiplies it in two digits
    (each x to within 2^-13 of its block's largest |x|, where float32 x gets three at one row: 2^-20): each output
    within the bound that gives, sum over columns of |w| 2^-13 (the row's block's largest |x|), of float64, with a
    value 1000x the others in one block of the first row and the second row 1000x smaller (its own blocks' scale).
    At three rows, and in every other build, bfloat16 x is used as float32 x is, to the bit. 9 groups: the zero
    points' term goes 8 groups at a time, then one."""
    g = torch.Generator().manual_seed(group)
    values = torch.randint(0, 16, (9, 9 * group), generator=g, dtype=torch.uint8)
    scale, zero = _groups(9, 9, g)
    dense = _int4(values, scale, zero)[0]
    x = torch.randn(rows, 9 * group, generator=g)
    x[0, 7] *= 1000
    x[1:] *= 1e-3
    x = x.to(dtype)
    want = x.double() @ dense.t()  # [rows, N]
    got = build.linear(x, pack_nibbles(values), scale, zero=zero).double()
    block = min(group, 256)
    largest = x.double().abs().view(rows, -1, block).amax(2).repeat_interleave(block, 1)  # [rows, K]: each block's
    bound = (largest * 2**-13) @ dense.abs().t()  # [rows, N]
    assert ((got - want).abs() <= bound + 1e-6 * want.abs().amax(1, keepdim=True)).all()
    as_float32 = build.linear(x.float(), pack_nibbles(values), scale, zero=zero).double()
    assert torch.equal(got, as_float32) == (build.simd != 256 or rows > 2), build.simd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [256, 192, 96, 100])  # blocks of 128, 64 and 32 columns; 100 takes the float loop
def test_int8_at_one_row_of_bfloat16_holds_each_x_to_its_block(build, k, dtype):
    """The AVX2 build multiplies a bfloat16 row of x by int8 weights in two digits too (each x to within 2^-13 of its
    block's largest |x|): every output within sum over columns of |w| 2^-13 (the block's largest |x|) of float64,
    with a value 1000x the others in one block; a K of no multiple of 32, and every other build, as float32 x."""
    g = torch.Generator().manual_seed(k)
    w = torch.randint(-128, 128, (9, k), generator=g, dtype=torch.int8)
    scale = torch.rand(9, generator=g) * 0.02 + 0.001
    dense = w.double() * scale.double()[:, None]
    x = torch.randn(1, k, generator=g)
    x[0, 7] *= 1000
    x = x.to(dtype)
    want = (x.double() @ dense.t())[0]
    got = build.linear(x, w, scale).double()[0]
    block = next((b for b in (128, 64, 32) if k % b == 0), k)
    largest = x.double().abs().view(-1, block).amax(1).repeat_interleave(block)  # [K]: each column's block's
    bound = (dense.abs() * largest).sum(1) * 2**-13  # [N]
    assert ((got - want).abs() <= bound + 1e-6 * want.abs().max()).all()
    as_float32 = build.linear(x.float(), w, scale).double()[0]
    assert torch.equal(got, as_float32) == (build.simd != 256 or k % 32 != 0), build.simd


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_row_paths_keep_a_value_that_is_not_finite(build, bad):
    """A NaN or infinity in x makes every output not finite, as in a float matmul (the fixed point cannot hold it, so
    that row takes the float loop): int4 with float32 and bfloat16 x, int8 with bfloat16 x."""
    g = torch.Generator().manual_seed(3)
    values = torch.randint(1, 16, (5, 64), generator=g, dtype=torch.uint8)
    x = torch.randn(1, 64, generator=g)
    x[0, 40] = bad
    for xd in (x, x.bfloat16()):  # three digits, two
        scale, zero = torch.full((5, 2), 0.01, dtype=torch.float16), torch.full((5, 2), 1, dtype=torch.uint8)
        got = build.linear(xd, pack_nibbles(values), scale, zero=zero)
        assert not torch.isfinite(got).any()
    int8 = torch.randint(1, 128, (5, 64), generator=g, dtype=torch.int8)
    assert not torch.isfinite(build.linear(x.bfloat16(), int8, torch.full((5,), 0.01))).any()  # the int8 path


@pytest.mark.parametrize("group", [16, 32, 96, 128, 512])
def test_tiled_int4_gives_the_same_bits_as_rows_in_order(build, group):
    """The AVX2 build reads int4 in tiles of 4 rows (``tile_rows``) to the same bits as rows in order, at 1-9 rows of
    float32 and bfloat16 x (the integer paths at one row, and two of bfloat16, and the float tiles of several rows), 7
    weight rows (a partial tile); other
    builds refuse it by name. ``untile_rows`` gives back any run of rows."""
    g = torch.Generator().manual_seed(group)
    k = 2 * max(group, 32)
    values = torch.randint(0, 16, (7, k), generator=g, dtype=torch.uint8)
    scale, zero = _groups(7, k // group, g)
    q = pack_nibbles(values)
    tiled = cpu_kernel.tile_rows(q)
    assert tiled.shape == (8, k // 2)
    for start, stop in [(0, 7), (1, 3), (4, 5), (3, 7), (6, 7)]:
        assert torch.equal(cpu_kernel.untile_rows(tiled, start, stop), q[start:stop])
    if build.simd != 256:
        with pytest.raises(ValueError, match="tiled int4 is the AVX2 build's"):
            build.linear(torch.randn(1, k), tiled, scale, zero=zero, tiled=True)
        return
    for m in (1, 2, 3, 5, 9):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=g).to(dtype)
            want = build.linear(x, q, scale, zero=zero)
            assert torch.equal(build.linear(x, tiled, scale, zero=zero, tiled=True), want), (m, dtype)


def _by_threads(build: cpu_kernel.Kernel, rows: int) -> list[tuple[torch.Tensor, ...]]:
    """fp8, int4 and bf16 products of ``rows`` rows on 1 thread, then on 2; int4 (tiled too, in the AVX2 build) and
    int8 also with bfloat16 x (the AVX2 build's integer paths: int4 at one or two rows, int8 at one)."""
    g = torch.Generator().manual_seed(0)
    fp8 = (torch.randn(1030, 1024, generator=g) * 40).to(torch.float8_e4m3fn)
    int4 = torch.randint(0, 256, (1030, 512), generator=g, dtype=torch.uint8)
    bf16 = torch.randn(1030, 1024, generator=g).bfloat16()
    scale, (groups, zero) = torch.rand(1030, generator=g), _groups(1030, 8, g)
    int8 = torch.randint(-128, 128, (1030, 1024), generator=g, dtype=torch.int8)
    x = torch.randn(rows, 1024, generator=g)
    xb, tiled = x.bfloat16(), cpu_kernel.tile_rows(int4)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((
                build.linear(x, fp8, scale),
                build.linear(x, int4, groups, zero=zero),
                build.linear(x, bf16, scale),
                build.linear(xb, int4, groups, zero=zero),
                build.linear(xb, int8, scale),
                *([build.linear(xb, tiled, groups, zero=zero, tiled=True)] if build.simd == 256 else []),
            ))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return results


@pytest.mark.parametrize("rows", [1, 2, 3, 9])  # tiles of 4 weight rows up to 4 (AVX-512) or 2 (AVX2) rows, else 2
def test_threads_split_rows_without_changing_a_bit(build, rows):
    """Each output is summed by one thread in one order, so 1 or 2 threads give identical results."""
    one, two = _by_threads(build, rows)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def _compiles_openmp(tmp_path: Path) -> bool:
    source = tmp_path / "omp.c"
    source.write_text("#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n")
    cc = os.environ.get("CC", "cc")
    return subprocess.run([cc, "-fopenmp", "-shared", "-fPIC", "-o", str(tmp_path / "omp.so"), str(source)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_its_threads_are_the_openmp_runtime_torch_loaded(tmp_path):
    """Where the compiler takes -fopenmp, the kernel's parallel loop runs on torch's OpenMP runtime: its
    GOMP_parallel is torch's (other packages may map runtimes of their own; its own threads would share the cores
    with torch's spinning ones)."""
    if not _compiles_openmp(tmp_path):
        pytest.skip("this C compiler has no OpenMP")
    k = cpu_kernel.kernel("auto")
    assert k is not None and k.openmp
    k.linear(torch.randn(3, 1024), torch.zeros(1030, 1024, dtype=torch.int8), torch.ones(1030))
    lib = (Path(torch.__file__).parent / "lib").resolve()  # /proc/self/maps shows resolved paths
    maps = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "gomp" in line}
    torchs = [m for m in maps if Path(m).parent == lib]
    if not torchs:
        pytest.skip(f"this torch loads no libgomp of its own ({sorted(maps)})")
    address = ctypes.cast(k.lib.GOMP_parallel, ctypes.c_void_p).value
    assert address == ctypes.cast(ctypes.CDLL(torchs[0]).GOMP_parallel, ctypes.c_void_p).value


@pytest.mark.parametrize("rows", [1, 3])
def test_a_build_with_threads_of_its_own_gives_the_same_bits(rows):
    """Without OpenMP the kernel starts threads of its own; the same SIMD code, so the same bits on 1 or 2."""
    own = cpu_kernel.load("auto", openmp=False)
    shared = cpu_kernel.kernel("auto")
    assert own is not None and shared is not None and not own.openmp
    if not shared.openmp:
        pytest.skip("this C compiler has no OpenMP: both are the same build")
    mine, theirs = _by_threads(own, rows), _by_threads(shared, rows)
    assert all(torch.equal(a, b) for a, b in zip(mine[0] + mine[1], theirs[0] + theirs[1], strict=True))


@pytest.mark.parametrize("failure", ["compile", "load"])
def test_an_openmp_build_that_fails_gives_way_to_one_without(tmp_path, monkeypatch, failure):
    """A compiler without OpenMP (compile), or an OpenMP build linked against a runtime library the loader then
    cannot find, as clang's libomp outside the library path (load): the build without OpenMP is loaded instead of
    turning the kernel off."""
    if failure == "compile":
        on_openmp = 'echo "no OpenMP here" >&2; exit 1'
    else:
        fake = tmp_path / "fake"
        fake.mkdir()
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(fake / "libnowhere.so"), "-x", "c", "/dev/null"],
                       check=True)  # fmt: skip
        on_openmp = f'exec cc "$@" -L{fake} -Wl,--no-as-needed -lnowhere'  # a library the loader will not find
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-fopenmp*) {on_openmp};; esac\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    k = cpu_kernel.load("portable")  # (the fallback is the same for every variant; this one compiles fastest)
    assert k is not None and not k.openmp
    x, w = torch.randn(2, 64), torch.randint(-128, 128, (8, 64), dtype=torch.int8)
    _check(k.linear(x, w, torch.ones(8)), x, w.double())


def _ones(n: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n, groups, dtype=torch.float16), torch.ones(n, groups, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("x", "w", "scale", "zero", "message"),
    [
        (torch.randn(2, 31), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), None, "w must be [N, K]"),
        (torch.randn(2, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(3), None, "scale [N] or [1]"),
        (torch.randn(2, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, dtype=torch.bfloat16), None,
         "scale must be float32, not torch.bfloat16"),
        (torch.randn(2, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), torch.ones(4), "take no zero"),
        (torch.randn(1, 2, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4), None, "x and w must be 2-D"),
        (torch.randn(2, 32), torch.zeros(4, 32, device="meta", dtype=torch.int8), torch.ones(4), None,
         "every tensor must be on the CPU"),
        (torch.randn(2, 32), torch.zeros(4, 32, dtype=torch.int16), torch.ones(4), None, "not torch.int16"),
        (torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), None, "scale and zero of one"),
        (torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 2),
         "float16 scales and uint8 zero points, not torch.float32 and torch.float32"),
        (torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2, dtype=torch.float16),
         torch.ones(4, 2), "float16 scales and uint8 zero points, not torch.float16 and torch.float32"),
        (torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8), *_ones(1, 2), "[N, K / G]"),
        (torch.randn(2, 48), torch.zeros(4, 24, dtype=torch.uint8), *_ones(4, 2), "of 16"),
        (torch.randn(2, 32), torch.zeros(4, 16, dtype=torch.uint8), *_ones(4, 4), "of 16"),
        (torch.randn(2, 288), torch.zeros(4, 144, dtype=torch.uint8), *_ones(4, 17), "K / G"),
    ],
)  # fmt: skip
def test_operands_it_cannot_take_are_refused_by_name(build, x, w, scale, zero, message):
    with pytest.raises(ValueError, match="cpu kernel: ") as e:
        build.linear(x, w, scale, zero=zero)
    assert message in str(e.value)


def test_no_rows_or_no_outputs_give_an_empty_result(build):
    assert torch.equal(build.linear(torch.randn(2, 0), torch.zeros(4, 0, dtype=torch.int8), torch.ones(4)),
                       torch.zeros(2, 4))  # no columns: sums of nothing  # fmt: skip
    assert build.linear(torch.randn(0, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)).shape == (0, 4)
    assert build.linear(torch.randn(2, 32), torch.zeros(0, 32, dtype=torch.int8), torch.ones(1)).shape == (2, 0)


def test_the_build_is_cached_per_source_and_host(tmp_path, monkeypatch):
    """The plain-C build (under a second to compile) stands for any: cached per source, flags and host; one SIMD
    build (this CPU's, ~9 s at -O3) shows another variant is another file."""
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no other cache folder holds a build
    first = cpu_kernel.build("portable")
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.stat().st_mode & 0o555 == 0o555  # others sharing the folder load it
    assert cpu_kernel.build("portable") == first and first.stat().st_mtime_ns == stamp  # not compiled again
    monkeypatch.setenv("CC", "no-such-compiler")
    assert cpu_kernel.build("portable") == first  # a cached build needs no compiler
    monkeypatch.delenv("CC")
    assert cpu_kernel.build() != first
    monkeypatch.setattr(cpu_kernel, "_host", lambda: "another CPU")
    assert cpu_kernel.build("portable") != first  # a shared cache never hands one host another's -march=native binary
    monkeypatch.undo()
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    changed = tmp_path / "changed.c"
    changed.write_text(cpu_kernel.SOURCE.read_text() + "/* changed */\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", changed)
    assert cpu_kernel.build("portable") != first  # a new source: a new build
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".so"]) == 4  # and no half-written files left


def test_the_temp_fallback_is_a_folder_only_this_user_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernel.tempfile, "tempdir", str(tmp_path))
    own = cpu_kernel._private_temp()
    assert own == tmp_path / f"mixserve-kernels-{os.getuid()}" and own.stat().st_mode & 0o777 == 0o700
    own.chmod(0o777)  # as if another user had made it, writable by anyone: never used
    other = cpu_kernel._private_temp()
    assert other != own and other.parent == tmp_path and other.stat().st_mode & 0o077 == 0


def test_without_a_compiler_the_kernel_is_off_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path))  # nothing cached
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    with caplog.at_level(logging.WARNING, logger="mixserve.quant"):
        assert cpu_kernel.kernel("auto") is None
    assert "no C compiler (no-such-compiler)" in caplog.text


def test_a_mode_it_does_not_know_is_an_error(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "fast")
    with pytest.raises(ValueError, match="MIXSERVE_CPU_KERNEL='fast': use one of auto, avx2, portable, off"):
        cpu_kernel.mode()
