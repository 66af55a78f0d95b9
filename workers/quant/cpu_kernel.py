"""The fused CPU kernel of ``cpu_kernel.c``: ``y = x @ w.T`` for weights stored in one byte (float8 e4m3fn, int8,
with a scale per row or matrix) or half a byte (4-bit values with a scale and zero per group), decoded in registers
for the few rows per expert of a decode step. No Ray here.

The C file is compiled once per host with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native``) into
a cache folder (``$MIXSERVE_KERNEL_CACHE``, else ``~/.cache/mixserve/kernels``, else the temp folder) and loaded with
ctypes, which releases the GIL for the call. The file name holds a hash of the source, the flags and this CPU's
model and flags, so a cache shared between different hosts never hands one a binary built for another.

``$MIXSERVE_CPU_KERNEL`` chooses: ``auto`` (default: the AVX-512 build where the CPU has it, else portable C),
``portable`` (the plain-C loop, what a CPU without AVX-512 runs), ``off`` (torch's kernels and the dequantize path
only). Without a compiler, or if the build fails, :func:`kernel` answers None and says why once in the log; nothing
requires it.

Letters: M rows of x, N output features, K input features.
"""

from __future__ import annotations

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
MODES = ("auto", "portable", "off")
SOURCE = Path(__file__).with_name("cpu_kernel.c")
KINDS = {torch.float8_e4m3fn: 0, torch.int8: 1}  # the stored dtype -> the C kernel's ``kind``
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
_WORK_PER_THREAD = 1 << 20  # weights x rows one thread takes before another is started


@dataclass(frozen=True)
class Kernel:
    """A loaded build: ``simd`` 512 (AVX-512) or 0 (portable C)."""

    lib: ctypes.CDLL
    simd: int

    @property
    def name(self) -> str:
        return "fused decode + matmul (C, " + ("AVX-512" if self.simd else "portable") + ")"

    def linear(
        self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [M, K] (any float dtype) times w as stored -> float32 [M, N]:

        - w [N, K] float8_e4m3fn or int8, scale float32 [N] or [1] (one for the matrix), zero None;
        - w uint8 [N, K / 2] of 4-bit values (column 2i in the low nibble of byte i), scale and zero float32
          [N, K / G] (groups of G columns, G a multiple of 16): the weight (q - zero) * scale.

        Example: x [[1., 2.]], w int8 [[3, -1]], scale [0.5] -> [[0.5]] (= (1 * 3 + 2 * -1) * 0.5).
        """
        m, k = x.shape
        n = w.shape[0]
        packed = w.dtype == torch.uint8
        group = k // scale.shape[1] if packed and scale.dim() == 2 else 0
        fits = (
            scale.dtype == torch.float32
            and x.device.type == "cpu"
            and (
                (w.dtype in KINDS and w.shape[1] == k and scale.numel() in (1, n) and zero is None)
                or (packed and w.shape[1] * 2 == k and zero is not None and group and zero.shape == scale.shape)
            )
        )
        if not fits:
            raise ValueError(
                f"cpu kernel: x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype}, scale {tuple(scale.shape)}"
            )
        x = x.float().contiguous()
        w, scale = w.contiguous(), scale.contiguous()
        zero = None if zero is None else zero.float().contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        threads = max(1, min(torch.get_num_threads(), n * k * m // _WORK_PER_THREAD))
        kind, per_row = 2 if packed else KINDS[w.dtype], int(packed or scale.numel() != 1)
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
        )
        if rc != 0:
            raise ValueError(f"cpu kernel refused x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype}, group {group}")
        return out


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
            _LOADED[want] = _load(portable=want == "portable")
        return _LOADED[want]


def _load(*, portable: bool) -> Kernel | None:
    try:
        path = build(portable=portable)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the fused CPU kernel is unavailable (%s); quantized experts use torch's kernels", e)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.mixserve_qlinear.argtypes = [i, p, i, i, p, i, p, i, p, i, p, i]
    lib.mixserve_qlinear.restype = i
    lib.mixserve_simd.restype = i
    k = Kernel(lib, int(lib.mixserve_simd()))
    log.info("fused CPU kernel: %s (%s)", k.name, path)
    return k


def build(*, portable: bool = False) -> Path:
    """The compiled library for this host (built now unless cached); RuntimeError when no compiler works."""
    flags = [*_FLAGS, *(["-DMIXSERVE_PORTABLE"] if portable else [])]
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode() + _host().encode()).hexdigest()[:16]
    folder = _cache_folder()
    path = folder / f"mixserve_qlinear_{key}.so"
    if path.is_file():
        return path
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
    os.close(fd)
    try:  # built beside the final name and renamed: workers that build at once never load a half-written file
        done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _host() -> str:
    """This CPU's model and flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _cache_folder() -> Path:
    for folder in (os.environ.get(CACHE_ENV), Path.home() / ".cache" / "mixserve" / "kernels"):
        if folder:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                if os.access(folder, os.W_OK):
                    return Path(folder)
            except OSError:
                continue
    fallback = Path(tempfile.gettempdir()) / f"mixserve-kernels-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback
