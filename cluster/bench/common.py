"""What every benchmark shares: machine and version info, the bench model, timing helpers, progress lines on
stderr, the printed table and the JSON report.

A report is ``{"benchmark", "created", "machine", "versions", "settings", "method", "results", "goals"}``; each goal
is ``{"goal", "measured", "met"}`` (``met`` is None, with a ``note``, when the run could not measure it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("bench-results")
BENCH_MODEL_NAME = "bench-v1"


# ---------------------------------------------------------------------- machine and versions
def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gpu_info() -> list[dict[str, Any]]:
    """One entry per visible CUDA device; empty on a CPU machine."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory)})
    return out


def machine_info() -> dict[str, Any]:
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "memory_available_bytes": _meminfo_bytes("MemAvailable"),
        "gpus": gpu_info(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "load_avg_start": load_avg(),
        "contention_probe_us_start": contention_probe_us(),
    }


def end_probes(progress: Progress | None = None) -> dict[str, Any]:
    """Load and contention at the end, plus the worst probe taken at each progress line during the run."""
    out: dict[str, Any] = {"load_avg_end": load_avg(), "contention_probe_us_end": contention_probe_us()}
    if progress is not None and progress.probes:
        out["contention_probe_us_p90_max_during"] = max(progress.probes)
    return out


def load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def contention_probe_us(iters: int = 300) -> dict[str, float]:
    """p50 and p90 microseconds of a small multi-threaded torch op (an in-place add of 64k floats).

    A few microseconds on an idle machine; milliseconds when other processes hold the cores, because each parallel
    region then waits for a descheduled thread. Recorded at the start and end of each run to flag noisy timings.
    """
    import torch

    a, b = torch.zeros(65536), torch.ones(65536)
    t = time_calls(lambda: a.add_(b), iters, warmup=20)
    return {"p50": percentile(t, 50) * 1e6, "p90": percentile(t, 90) * 1e6}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "transformers": _version("transformers"),
        "mixserve": _version("mixserve"),
    }


# ---------------------------------------------------------------------- the bench model
def bench_model_dir() -> Path:
    """The benchmark-sized checkpoint (``BENCH_SPEC``), written once into ``$MIXSERVE_CACHE`` (~/.cache/mixserve)."""
    from cluster.tiny_model import BENCH_SPEC, write_tiny_model

    root = Path(os.environ.get("MIXSERVE_CACHE", Path.home() / ".cache" / "mixserve"))
    folder = root / BENCH_MODEL_NAME
    if not (folder / "config.json").is_file():
        tmp = root / f".{BENCH_MODEL_NAME}.tmp-{os.getpid()}"
        write_tiny_model(tmp, BENCH_SPEC)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race; its copy is identical (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(model: str | Path | None, default: Callable[[], Path] = bench_model_dir) -> str:
    return str(model) if model else str(default())


# ---------------------------------------------------------------------- progress and timing
class Progress:
    """``[bench NAME  12.3s] message`` lines on stderr; each line also takes a short contention probe."""

    def __init__(self, name: str, *, quiet: bool = False) -> None:
        self.name = name
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.probes: list[float] = []

    def __call__(self, message: str) -> None:
        self.probes.append(contention_probe_us(50)["p90"])
        if not self.quiet:
            print(f"[bench {self.name} {time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def time_calls(fn: Callable[[], object], iters: int, *, warmup: int = 1) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, min, mean, p50, p99 of a list of seconds."""
    if not values:
        return {"n": 0, "min": None, "mean": None, "p50": None, "p99": None}
    return {
        "n": len(values),
        "min": min(values),
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# ---------------------------------------------------------------------- goals, tables, reports
def goal(text: str, measured: float | None, threshold: float, *, at_least: bool, note: str | None = None) -> dict:
    """``{goal, measured, threshold, met}``: met is ``measured >= threshold`` (at_least) or ``<=``; None when
    unmeasured."""
    met = None if measured is None else bool(measured >= threshold if at_least else measured <= threshold)
    out: dict[str, Any] = {"goal": text, "measured": measured, "threshold": threshold, "met": met}
    if note:
        out["note"] = note
    return out


def fmt(v: Any) -> str:
    """Table cell: None as "-", booleans as yes/no, floats with 1-3 decimals by magnitude."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> str:
    """Text columns left-aligned, numbers right-aligned, None as "-"."""
    rows = [list(r) for r in rows]
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for raw, r in zip(rows, cells, strict=True):
        just = [c.ljust(w) if isinstance(v, str) else c.rjust(w) for v, c, w in zip(raw, r, widths, strict=True)]
        lines.append("  ".join(just).rstrip())
    return "\n".join(lines)


def goals_table(goals: Sequence[dict]) -> str:
    rows = [(g["goal"], g["measured"], g["threshold"], "n/a" if g["met"] is None else g["met"]) for g in goals]
    return table(["goal", "measured", "threshold", "met"], rows, title="goals")


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def report(
    name: str, *, settings: dict, method: dict | str, results: dict, goals: list[dict], machine: dict | None = None
) -> dict:
    return {
        "benchmark": name,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine or machine_info(),
        "versions": versions(),
        "settings": settings,
        "method": method,
        "results": results,
        "goals": goals,
    }


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


CONTENDED_US = 100.0


def contention_warning(machine: dict) -> str | None:
    """A warning when the contention probe says other processes held the cores during the run."""
    probes = [machine.get(k) for k in ("contention_probe_us_start", "contention_probe_us_end")]
    worst = max([p["p90"] for p in probes if p] + [machine.get("contention_probe_us_p90_max_during") or 0.0])
    if worst < CONTENDED_US:
        return None
    return (
        f"WARNING: the CPU was contended (probe p90 {worst:.0f} us, idle ~5 us; load {machine.get('load_avg_end')}): "
        "other processes held the cores and these timings are unreliable; rerun on a quiet machine."
    )


def finish(payload: dict, out: str | Path | None, tables: Sequence[str]) -> Path:
    """Print the tables and the goals, write the JSON, say where."""
    warning = contention_warning(payload["machine"])
    if warning:
        payload["warning"] = warning
    for t in tables:
        print(t)
        print()
    print(goals_table(payload["goals"]))
    if warning:
        print(f"\n{warning}")
    path = write_json(out or default_out(payload["benchmark"]), payload)
    print(f"\nwrote {path}")
    return path


# ---------------------------------------------------------------------- arguments
def int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def pair(values: list[int], flag: str) -> tuple[int, int]:
    if len(values) != 2 or values[0] > values[1] or values[0] < 1:
        raise SystemExit(f"mixserve bench: {flag} takes MIN,MAX with 1 <= MIN <= MAX")
    return values[0], values[1]


def str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench-results/<name>-<timestamp>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


# ---------------------------------------------------------------------- processes
def rss_bytes(pid: int | str = "self") -> dict[str, int | None]:
    """Resident (VmRSS) and peak resident (VmHWM) bytes of a process, from /proc (Linux)."""
    out: dict[str, int | None] = {"rss": None, "peak_rss": None}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss"] = int(line.split()[1]) * 1024
    return out


def init_ray(min_cpus: int) -> bool:
    """Start a private local Ray with at least ``min_cpus`` logical CPUs unless this process already has one; True
    if we started it. ``address="local"`` keeps the benchmark off any cluster that ``ray start`` left running."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, min_cpus),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True
