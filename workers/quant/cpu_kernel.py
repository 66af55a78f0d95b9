"""The fused CPU kernel of ``cpu_kernel.c``: ``y = x @ w.T`` for weights stored in one byte (float8 e4m3fn, int8,
with a scale per row or matrix), half a byte (4-bit values with a scale and zero per group) or as bfloat16, decoded
in registers for the few rows per matrix of a decode step. No Ray here.

The C file is compiled once per host with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native``) into
a cache folder (``$MIXSERVE_KERNEL_CACHE``, else ``~/.cache/mixserve/kernels``, else a temp folder only this user
writes) and loaded with ctypes, which releases the GIL for the call. It is built with ``-fopenmp`` where the compiler
takes it, so its threads are those of the OpenMP runtime torch already loaded (libgomp.so.1, one per process): they
spin for a while after each of torch's parallel ops, and threads of the kernel's own ran beside them on the same
cores (on 2 cores, a 14336 x 4096 int4 matrix at 3 / 4 / 8 rows took 6.2 / 7.7 / 12.9 ms after a torch op, 3.3 / 4.1 /
7.9 with torch's threads asleep). Without OpenMP it starts threads of its own per call. The file name holds a hash of
the source, the flags and this CPU's model and flags, so a cache shared between different hosts never hands one a
binary built for another.

``$MIXSERVE_CPU_KERNEL`` chooses: ``auto`` (default: the AVX-512 build where the CPU has it, else AVX2 with FMA and
F16C, else portable C), ``avx2`` (the AVX2 build even where AVX-512 is there), ``portable`` (the plain-C loop, what a
CPU without either runs), ``off`` (torch's kernels and the dequantize path only). With no cached build and no
compiler, or if the build fails, :func:`kernel` answers None and says why once in the log; nothing requires it.

Letters: M rows of x, N output features, K input features.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.quant.kernels import log

ENV = "MIXSERVE_CPU_KERNEL"
CACHE_ENV = "MIXSERVE_KERNEL_CACHE"
MODES = ("auto", "avx2", "portable", "off")
SOURCE = Path(__file__).with_name("cpu_kernel.c")
# the stored dtype -> the C kernel's ``kind`` (2 is packed int4, stored as uint8)
KINDS = {torch.float8_e4m3fn: 0, torch.int8: 1, torch.bfloat16: 3}
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# per mode but off; avx2 elsewhere than x86 is the portable loop (-mno-avx512f is an x86 option)
_BUILD_FLAGS = {
    "auto": [],
    "avx2": ["-mno-avx512f" if _X86 else "-DMIXSERVE_PORTABLE"],
    "portable": ["-DMIXSERVE_PORTABLE"],
}
_WORK_PER_THREAD = 1 << 20  # weights x rows one thread takes before another is started
_X_BITS = {torch.bfloat16: 8, torch.float16: 11}  # significant bits of x the kernel is told of (float32: 24)


@dataclass(frozen=True)
class Kernel:
    """A loaded build: ``simd`` 512 (AVX-512), 256 (AVX2 with FMA and F16C) or 0 (portable C); ``openmp``: its
    threads are the process's OpenMP ones (torch's), else threads it starts per call."""

    lib: ctypes.CDLL
    simd: int
    openmp: bool = False

    @property
    def name(self) -> str:
        return "fused decode + matmul (C, " + {512: "AVX-512", 256: "AVX2"}.get(self.simd, "portable") + ")"

    def linear(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        scale: torch.Tensor,
        *,
        zero: torch.Tensor | None = None,
        tiled: bool = False,
    ) -> torch.Tensor:
        """x [M, K] (any float dtype) times w as stored -> float32 [M, N]:

        - w [N, K] float8_e4m3fn, int8 or bfloat16, scale float32 [N] or [1] (one for the matrix), zero
          None;
        - w uint8 [N, K / 2] of 4-bit values (column 2i in the low nibble of byte i), scale float16 and zero uint8
          [N, K / G] (groups of G columns, G a multiple of 16): the weight (q - zero) * scale; ``tiled``: w as
          :func:`tile_rows` lays it out (the AVX2 build only), N the rows of scale.

        At one row of int4, the AVX2 build holds x in fixed point per block of columns: to 2^-20 of the block's
        largest |x| for float32 x, 2^-13 for bfloat16 or float16 x (8 or 11 significant bits of their own). So it does
        at two rows of int4 and one row of int8 with bfloat16 or float16 x (2^-13; float32 x takes the float loops
        there).

        Example: x [[1., 2.]], w int8 [[3, -1]], scale [0.5] -> [[0.5]] (= (1 * 3 + 2 * -1) * 0.5).
        """
        problem = _problem(x, w if not tiled else w[: scale.shape[0]], scale, zero)
        if tiled and not problem and (self.simd != 256 or w.shape[0] != -(-scale.shape[0] // 4) * 4 or x.shape[1] % 32):
            problem = "tiled int4 is the AVX2 build's: w [N rounded up to 4, K / 2], K a multiple of 32"
        if problem:
            raise ValueError(f"cpu kernel: {problem} (x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype})")
        (m, k), n = x.shape, (w.shape[0] if not tiled else scale.shape[0])
        packed = w.dtype == torch.uint8
        group = k // scale.shape[1] if packed else 0
        if m == 0 or n == 0 or k == 0:  # k == 0: sums of nothing
            return torch.zeros(m, n, dtype=torch.float32)
        x_bits = _X_BITS.get(x.dtype, 24)  # bfloat16 x: two digits in the AVX2 integer int4 and int8 paths
        x = x.float().contiguous()
        w, scale = w.contiguous(), scale.contiguous()
        zero = None if zero is None else zero.contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        threads = max(1, min(torch.get_num_threads(), n * k * m // _WORK_PER_THREAD))
        kind, per_row = (4 if tiled else 2) if packed else KINDS[w.dtype], int(packed or scale.numel() != 1)
        zero_ptr = None if zero is None else zero.data_ptr()
        rc = self.lib.mixserve_qlinear(
            kind,
            x.data_ptr(),
            m,
            k,
            w.data_ptr(),
            n,
            scale.data_ptr(),
            per_row,
            zero_ptr,
            group,
            out.data_ptr(),
            threads,
            x_bits,
        )
        if rc != 0:
            raise MemoryError(f"cpu kernel: out of memory for x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype}")
        return out


def tile_rows(q: torch.Tensor) -> torch.Tensor:
    """Packed int4 rows q [N, K / 2] (K a multiple of 32) -> the AVX2 build's tiled layout [N4, K / 2] (N4: N rounded
    up to 4, the extra rows zero): in each tile of 4 rows, the 16 bytes (32 columns) of each row in turn, then their
    next 16, so a one-row pass reads each tile as one run of bytes.

    Example: rows a, b, c, d of 32 bytes each -> a[:16] b[:16] c[:16] d[:16] a[16:] b[16:] c[16:] d[16:].
    """
    n, half = q.shape
    padded = torch.zeros(-(-n // 4) * 4, half, dtype=q.dtype)
    padded[:n] = q
    return padded.view(-1, 4, half // 16, 16).transpose(1, 2).contiguous().view(-1, half)


def untile_rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start .. stop of :func:`tile_rows`' layout as packed int4 rows [stop - start, K / 2]."""
    half = t.shape[1]
    first, last = start // 4, -(-stop // 4)
    rows = t[4 * first : 4 * last].view(-1, half // 16, 4, 16).transpose(1, 2).reshape(-1, half)
    return rows[start - 4 * first : stop - 4 * first]


def _problem(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> str:
    """What makes these operands ones the kernel cannot take ('' when none): every check the C code relies on."""
    tensors = [x, w, scale] + ([] if zero is None else [zero])
    if any(t.device.type != "cpu" for t in tensors):
        return "every tensor must be on the CPU"
    if x.dim() != 2 or w.dim() != 2:
        return "x and w must be 2-D"
    (m, k), n = x.shape, w.shape[0]
    if max(m, n, k) >= 2**31:
        return "sizes must be below 2^31"
    if w.dtype in KINDS:
        if scale.dtype != torch.float32:
            return f"scale must be float32, not {scale.dtype}"
        if zero is not None:
            return f"{w.dtype} weights take no zero points"
        if w.shape[1] != k or scale.numel() not in (1, n) or scale.dim() > 2:
            return f"w must be [N, K] and scale [N] or [1], scale is {tuple(scale.shape)}"
        return ""
    if w.dtype != torch.uint8:
        return f"w must be float8_e4m3fn, int8, bfloat16 or uint8 (packed int4), not {w.dtype}"
    if zero is None or scale.dim() != 2 or zero.shape != scale.shape or w.shape[1] * 2 != k:
        return "packed int4 needs w [N, K / 2] and scale and zero of one shape [N, K / G]"
    if scale.dtype != torch.float16 or zero.dtype != torch.uint8:
        return f"packed int4 needs float16 scales and uint8 zero points, not {scale.dtype} and {zero.dtype}"
    groups = scale.shape[1]
    if scale.shape[0] != n or groups == 0 or k % groups or (k // groups) % 16:
        return f"scale {tuple(scale.shape)} must be [N, K / G] with a group size G that is a multiple of 16"
    return ""


_LOCK = threading.Lock()
_LOADED: dict[str, Kernel | None] = {}


def mode() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


def kernel(want: str | None = None) -> Kernel | None:
    """The build ``want`` names (default: :func:`mode`), compiled and loaded once per process; None when off or
    when it cannot be built here (logged once)."""
    want = want or mode()
    if want == "off":
        return None
    with _LOCK:
        if want not in _LOADED:
            _LOADED[want] = load(want)
        return _LOADED[want]


def load(variant: str, *, openmp: bool = True) -> Kernel | None:
    """``variant`` built (:func:`build`) and loaded, each call anew; None (logged) when it cannot be. An OpenMP
    build that links but does not load (its runtime library missing at run time) gives way to the build without."""
    try:
        path = build(variant, openmp=openmp)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            if not openmp:
                raise
            log.info("the fused CPU kernel's OpenMP build does not load (%s); building it without OpenMP", e)
            path = build(variant, openmp=False)
            lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the fused CPU kernel is unavailable (%s); quantized experts and dense bf16 use torch's kernels", e)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.mixserve_qlinear.argtypes = [i, p, i, i, p, i, p, i, p, i, p, i, i]
    lib.mixserve_qlinear.restype = i
    lib.mixserve_simd.restype = lib.mixserve_openmp.restype = i
    k = Kernel(lib, int(lib.mixserve_simd()), bool(lib.mixserve_openmp()))
    log.info("fused CPU kernel: %s, %s (%s)", k.name, "OpenMP threads" if k.openmp else "threads of its own", path)
    return k


def build(variant: str = "auto", *, openmp: bool = True) -> Path:
    """The compiled library of ``variant`` (a mode but off) for this host: a cached one where a cache folder holds
    it, else built now into the first writable one; RuntimeError when none is cached and no compiler works. With
    ``openmp`` it is built with OpenMP where the compiler can, else (or without ``openmp``) with threads of its own."""
    if openmp:
        try:
            return _build([*_FLAGS, *_BUILD_FLAGS[variant], "-fopenmp"])
        except (RuntimeError, subprocess.SubprocessError) as e:
            log.info("the fused CPU kernel builds without OpenMP (%s)", e)
    return _build([*_FLAGS, *_BUILD_FLAGS[variant]])


def _build(flags: list[str]) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _host().encode()).hexdigest()[:16]
    name = f"mixserve_qlinear_{key}.so"
    folders = _cache_folders()
    cached = next((f / name for f in folders if (f / name).is_file()), None)
    if cached is not None:
        return cached
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    folder = next((f for f in folders if os.access(f, os.W_OK)), None) or _private_temp()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
    os.close(fd)
    try:  # built beside the final name and renamed: workers that build at once never load a half-written file
        done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        os.chmod(tmp, 0o755)  # other users of a shared cache folder load it too
        os.replace(tmp, folder / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder / name


def _host() -> str:
    """This CPU's model and flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _cache_folders() -> list[Path]:
    """``$MIXSERVE_KERNEL_CACHE``, then ``~/.cache/mixserve/kernels`` (made where missing), those that exist."""
    candidates = [os.environ.get(CACHE_ENV)]
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder (an unnamed uid in a container)
        candidates.append(str(Path.home() / ".cache" / "mixserve" / "kernels"))
    out = []
    for folder in filter(None, candidates):
        with contextlib.suppress(OSError):
            Path(folder).mkdir(parents=True, exist_ok=True)
        if Path(folder).is_dir():
            out.append(Path(folder))
    return out


def _private_temp() -> Path:
    """A folder in the temp folder that only this user can write: its own ``mixserve-kernels-<uid>``, else a new one
    (never one another user made, whose files this process would load)."""
    folder = Path(tempfile.gettempdir()) / f"mixserve-kernels-{os.getuid()}"
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat() if folder.exists() else None
    if info is not None and folder.is_dir() and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        return folder
    return Path(tempfile.mkdtemp(prefix="mixserve-kernels-"))
