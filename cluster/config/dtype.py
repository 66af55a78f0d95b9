"""Which dtype ``dtype="auto"`` means on this machine, and whether this CPU has bf16 units.

``MIXSERVE_CPU_FAST_BF16`` forces the answer of :func:`cpu_has_fast_bf16` (``1``/``true``: yes, ``0``/``false``:
no; unset or empty: read ``/proc/cpuinfo``), so the choice ``auto`` makes can be reproduced on any machine. The
tests run :func:`resolve_dtype` and the parity checks under both answers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cluster.errors import SetupError

log = logging.getLogger("mixserve")

FAST_BF16_ENV = "MIXSERVE_CPU_FAST_BF16"
DTYPES = ("float32", "bfloat16", "float16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 runs faster than float32;
    ``$MIXSERVE_CPU_FAST_BF16`` overrides what the CPU says."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if forced:
        raise SetupError(f"{FAST_BF16_ENV}={forced!r}: use 1 or 0 (or leave it unset to ask the CPU)")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def checkpoint_dtype(folder: str | Path) -> str:
    """The dtype the checkpoint was saved in: ``torch_dtype`` (``dtype`` in newer configs) of its config.json;
    bfloat16 for the original Mistral layout (params.json), which states none; float32 when unreadable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return "bfloat16"
    saved = json.loads(path.read_text())
    want = str(saved.get("torch_dtype") or saved.get("dtype") or "float32").removeprefix("torch.")
    return want if want in DTYPES else "float32"


def resolve_dtype(dtype: str, folder: str | Path, device: str) -> str:
    """``auto``: the checkpoint's own dtype (:func:`checkpoint_dtype`), except on a CPU: float16 runs as float32
    there, and bfloat16 too when the CPU has no bf16 units (:func:`cpu_has_fast_bf16`). Any other value is kept.

    Example: a bfloat16 checkpoint on ``cpu`` -> ``bfloat16`` with ``MIXSERVE_CPU_FAST_BF16=1``, ``float32`` with
    ``=0``; on ``cuda`` -> ``bfloat16``."""
    if dtype != "auto":
        return dtype
    want = checkpoint_dtype(folder)
    on_cpu = device.split(":")[0] == "cpu"
    if on_cpu and (want == "float16" or (want == "bfloat16" and not cpu_has_fast_bf16())):
        log.info("dtype auto: the checkpoint is %s; running float32 on this CPU (no fast %s matmuls)", want, want)
        return "float32"
    return want
