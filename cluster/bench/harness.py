"""What every benchmark shares: options, the bench model, Ray, machine and version info, timing and percentiles,
goals, tables, progress lines on stderr and the JSON report. Ray is imported only by :func:`local_ray`, so the
in-process benchmark (``engine``) runs where Ray is not installed.

A report is ``{"benchmark", "created", "machine", "versions", "settings", "method", "results", "goals"}``; each goal
is ``{"goal", "measured", "threshold", "met"}`` (``met`` is None, with a ``note``, when the run could not measure it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import torch

from cluster.checkpoint.tiny_model import BENCH_SPEC, TinyModelSpec, default_model_dir, write_tiny_model
from cluster.config.cluster import ClusterConfig
from cluster.config.options import add_options, options_from
from cluster.errors import MixserveError

RESULTS_DIR = Path("bench-results")
CONTENDED_US = 100.0  # contention probe p90 above this: other processes held the cores


def opt(default: Any, help: str) -> Any:
    """A dataclass field whose help text becomes its ``--flag``'s (``cluster.config.options``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Common:
    """The options of every benchmark. Each one's ``Options`` extends this: its docstring is the command's help,
    ``cluster_flags`` the ``ClusterConfig`` fields it also takes as flags, ``cluster_defaults`` its own defaults."""

    cluster_flags: ClassVar[tuple[str, ...]] = ()
    cluster_defaults: ClassVar[dict[str, Any]] = {}

    model: str | None = opt(None, "checkpoint folder (default: the bench-size model; serve: the built-in tiny model)")
    out: Path | None = opt(None, "JSON report (default: bench-results/<name>-<timestamp>.json)")
    quiet: bool = opt(False, "no progress lines on stderr")


def add_command(sub: argparse._SubParsersAction, name: str, options: type[Common], run: Callable[..., dict]) -> None:
    """``mixserve bench NAME``: flags from the ``options`` dataclass and its ``cluster_flags``;
    ``run(options, cluster_kwargs)`` does the work."""
    defaults, doc = options.cluster_defaults, options.__doc__ or ""
    epilog = "bench defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in defaults.items())
    p = sub.add_parser(name, help=doc, description=doc, epilog=epilog if defaults else None)
    add_options(p, options)
    skip = set(ClusterConfig.owners()) - set(options.cluster_flags)
    add_options(p, ClusterConfig, skip=skip)
    p.set_defaults(**defaults)

    def main(ns: argparse.Namespace) -> int:
        try:
            run(options(**options_from(ns, options)), options_from(ns, ClusterConfig, skip=skip))
        except MixserveError as e:  # a bad flag value (SetupError names the field), an unreadable checkpoint
            print(f"mixserve bench {name}: {e}", file=sys.stderr)
            return 2
        return 0

    p.set_defaults(func=main)


def ints(text: str, flag: str, *, span: bool = False) -> list[int]:
    """A flag's comma-separated positive integers ("1,8"); ``span``: exactly MIN,MAX with MIN <= MAX."""
    with contextlib.suppress(ValueError):
        v = [int(x) for x in text.split(",") if x.strip()]
        if v and min(v) >= 1 and (not span or (len(v) == 2 and v[0] <= v[1])):
            return v
    raise SystemExit(f"mixserve bench: --{flag} takes {'MIN,MAX' if span else 'positive integers'}, not {text!r}")


def model_dir(model: str | None, spec: TinyModelSpec = BENCH_SPEC, *, name: str = "bench-v1") -> str:
    """``model``, else the checkpoint of ``spec`` (random weights, stored in bfloat16 unless it is ``BENCH_SPEC``,
    which is float32), written once as ``name`` beside the built-in tiny model."""
    if model:
        return model
    folder = default_model_dir().parent / name
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(f".{name}.tmp-{os.getpid()}")
        write_tiny_model(tmp, spec, dtype=torch.float32 if spec == BENCH_SPEC else torch.bfloat16)
        with contextlib.suppress(OSError):  # another process won the race; its copy is identical (same seed)
            tmp.rename(folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


@contextlib.contextmanager
def local_ray(min_cpus: int) -> Iterator[None]:
    """A private local Ray with at least ``min_cpus`` logical CPUs for the block, unless this process has one already
    (then that one). ``address="local"`` keeps the benchmark off any cluster that ``ray start`` left running."""
    import ray  # only the benchmarks with expert workers or Serve need Ray

    started = not ray.is_initialized()
    if started:
        cpus = max(os.cpu_count() or 1, min_cpus)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def proc_fields(path: str) -> dict[str, str]:
    """The ``key: value`` lines of a /proc file (cpuinfo, meminfo, <pid>/status); empty where unreadable."""
    with contextlib.suppress(OSError):
        return {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in Path(path).read_text().splitlines())}
    return {}


def kib_bytes(fields: dict[str, str], key: str) -> int | None:
    """A ``kB`` field of :func:`proc_fields` in bytes."""
    return int(fields[key].split()[0]) * 1024 if key in fields else None


def load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine skews every timing."""
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def contention_probe_us(iters: int = 300) -> dict[str, float | None]:
    """p50 and p90 microseconds of a small multi-threaded torch op (an in-place add of 64k floats): a few us on an
    idle machine, milliseconds when other processes hold the cores (each parallel region waits for a thread)."""
    a, b = torch.zeros(65536), torch.ones(65536)
    t = [s * 1e6 for s in time_calls(lambda: a.add_(b), iters, warmup=20)]
    return {"p50": percentile(t, 50), "p90": percentile(t, 90)}


def machine_info() -> dict[str, Any]:
    mem = proc_fields("/proc/meminfo")
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu_model": proc_fields("/proc/cpuinfo").get("model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": kib_bytes(mem, "MemTotal"),
        "memory_available_bytes": kib_bytes(mem, "MemAvailable"),
        "gpus": [{"name": p.name, "memory_bytes": p.total_memory} for p in gpus],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "load_avg_start": load_avg(),
        "contention_probe_us_start": contention_probe_us(),
    }


def version_of(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        **{d: version_of(d) for d in ("torch", "ray", "transformers", "mixserve")},
    }


def sync() -> None:
    """Wait for queued GPU work, so a timer around it measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], iters: int, *, warmup: int = 1) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    s, pos = sorted(values), (len(values) - 1) * q / 100.0
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """n, min, p50 and p99 of a list of seconds, in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {"n": len(ms), "min": min(ms, default=None), "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def goal(text: str, measured: float | None, threshold: float, *, at_least: bool, note: str | None = None) -> dict:
    """``{goal, measured, threshold, met}``: met is ``measured >= threshold`` (at_least) or ``<=``; None when
    unmeasured."""
    met = None if measured is None else bool(measured >= threshold if at_least else measured <= threshold)
    return {"goal": text, "measured": measured, "threshold": threshold, "met": met, **({"note": note} if note else {})}


def fmt(v: Any) -> str:
    """Table cell: None as "-", booleans as yes/no, floats with 3 significant digits (1 decimal from 100 up)."""
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:#.3g}"
    return "-" if v is None else ("yes" if v else "no") if isinstance(v, bool) else str(v)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, title: str) -> str:
    """One line per row, one column per key (the header); text left-aligned, numbers right-aligned, None as "-"."""
    raw = [list(columns)] + [[r.get(c) for c in columns] for r in rows]
    cells = [[fmt(v) for v in r] for r in raw]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    just = [
        [c.ljust(w) if isinstance(v, str) else c.rjust(w) for v, c, w in zip(*r, widths, strict=True)]
        for r in zip(raw, cells, strict=True)
    ]
    lines = ["  ".join(r).rstrip() for r in just]
    return "\n".join([title, lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


class Run:
    """One benchmark run: ``run("message")`` prints ``[bench NAME  12.3s] message`` on stderr (and takes a short
    contention probe); :meth:`finish` prints the tables and goals and writes the JSON report."""

    def __init__(self, name: str, options: Common) -> None:
        self.name, self.options = name, options
        self.t0 = time.monotonic()
        self.probes: list[float] = []
        self.machine = machine_info()

    def __call__(self, message: str) -> None:
        self.probes.append(contention_probe_us(50)["p90"] or 0.0)
        if not self.options.quiet:
            print(f"[bench {self.name} {time.monotonic() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)

    def finish(self, *, settings: dict, method: Any, results: dict, goals: list[dict], tables: list[str]) -> dict:
        m = self.machine
        m.update(load_avg_end=load_avg(), contention_probe_us_end=contention_probe_us())
        m["contention_probe_us_p90_max_during"] = max(self.probes, default=None)
        payload: dict[str, Any] = {
            "benchmark": self.name,
            "created": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": m,
            "versions": versions(),
            "settings": {**asdict(self.options), **settings},
            "method": method,
            "results": results,
            "goals": goals,
        }
        worst = max(m["contention_probe_us_start"]["p90"] or 0, m["contention_probe_us_end"]["p90"] or 0, *self.probes)
        if worst >= CONTENDED_US:
            payload["warning"] = (
                f"WARNING: the CPU was contended (probe p90 {worst:.0f} us, idle ~5 us; load {m['load_avg_end']}): "
                "other processes held the cores and these timings are unreliable; rerun on a quiet machine."
            )
        rows = [{**g, "met": "n/a" if g["met"] is None else g["met"]} for g in goals]
        for text in [*tables, table(rows, ["goal", "measured", "threshold", "met"], title="goals")]:
            print(text, end="\n\n")
        if "warning" in payload:
            print(payload["warning"], end="\n\n")
        path = Path(self.options.out or RESULTS_DIR / f"{self.name}-{datetime.now():%Y%m%d-%H%M%S}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {path}")
        return payload
