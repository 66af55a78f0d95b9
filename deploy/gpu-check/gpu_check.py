"""``make gpu-check``: the one command to run on a lent GPU box (one H100, offline, 15 minutes of device time).

The box has Python 3.12 with torch, transformers, safetensors, sentencepiece and numpy, and no Ray: the check runs
the in-process path (W = 0, ``expert_workers=0``). First, here: ``make gpu-wheels`` (``download_wheels.py``) puts
the other wheels it needs into ``gpu-wheels/``. Then, through the device tool, carrying that folder::

    run(command="make gpu-check", carry=["gpu-wheels"], timeout_s=510)

(``python3 deploy/gpu-check/gpu_check.py`` is the same where ``make`` is missing). In at most ``--budget-s`` seconds
(470 by default: 8 minutes less the report's margin), each step in a child process with its own time limit:

1. info: Python, glibc, torch and its CUDA, the GPU (name, capability, memory), ``nvidia-smi``.
2. install: the wheels of ``--wheels`` whose distribution this Python lacks, by ``pip install --no-index
   --no-deps --target gpu-check-site`` (gitignored; unzipped there where this Python has no pip). The steps below
   run with ``PYTHONPATH=<repo>:gpu-check-site``, so the box's own packages stay as they are.
3. imports: the W = 0 modules (``cluster.llm``, ``cluster.runtime.local``, ``cluster.bench.engine``,
   ``cluster.cli``), transformers and pytest, with Ray absent.
4. pytest: ``pytest tests/gpu -p no:cacheprovider`` (bf16 parity with transformers on CUDA: prefill logits whole
   and chunked, greedy decode tokens, decode log-probabilities; the attention backend choice; the quantized experts'
   CUDA kernels: int4 tinygemm, int8, fp8 through ``_scaled_mm``), with JUnit XML.
5. bench: ``mixserve bench engine --device cuda --dtype bfloat16`` at W = 0 on the bench model, sized to finish in
   a few minutes (``BENCH_CUDA``; ``--bench-args`` replaces it).

It writes ``gpu-check.json`` into ``$OUT`` when set (the device tool brings that folder back), else into
``gpu-check-results/`` (gitignored): each step's command, exit status, seconds and output tail, pytest's outcome
counts and failures (from ``junit.xml``), the bench's JSON report, and whether every step passed; the full output of
each step is beside it in ``<step>.log``. Without CUDA (``torch.cuda.is_available()`` false) steps 3-5 are skipped
with that reason, the report is still written, and the exit status is 0; ``--rehearse`` runs them anyway, on the CPU
(the gpu tests skip themselves; a tiny bench), to try this script on a machine without a GPU. Exit status: 0 when
no step failed, else 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
REPORT = "gpu-check.json"
TAIL_CHARS = 4000
MARGIN_S = 10.0  # kept back from the budget to write the report
# Most seconds each step may take (less when the budget runs short).
STEP_LIMIT_S = {"info": 60.0, "install": 90.0, "imports": 60.0, "pytest": 180.0, "bench": 240.0}
# W = 0 engine bench on an H100, sized to a few minutes (every part of it, smaller than its defaults).
BENCH_CUDA = (
    "--batch-sizes 1,8,32 --new-tokens 32 --repeats 2 --floor-iters 10 --mixed-requests 16 --prefix-requests 16 "
    "--capacity-requests 16"
)
# The CPU rehearsal: every part of the bench, as small as tests/unit/test_bench_cli.py runs it.
BENCH_REHEARSAL = (
    "--batch-sizes 1,2 --new-tokens 3 --prompt-len 4 --repeats 1 --floor-iters 1 --mixed-requests 3 "
    "--mixed-prompt-len 2,6 --mixed-max-tokens 2,4 --hf-batch 2 --max-num-seqs 4 --max-num-batched-tokens 16 "
    "--max-model-len 64 --prefix-requests 3 --prefix-len 32 --prefix-question-len 2,4 --prefix-new-tokens 2 "
    "--capacity-requests 6 --capacity-len 16 --capacity-slots 4"
)
INFO = """
import json, os, platform, subprocess
import torch
cuda = torch.cuda.is_available()
gpus = []
for i in range(torch.cuda.device_count() if cuda else 0):
    p = torch.cuda.get_device_properties(i)
    cap = list(torch.cuda.get_device_capability(i))
    gpus.append({"name": p.name, "capability": cap, "memory_bytes": p.total_memory})
try:
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.SubprocessError) as e:
    smi = repr(e)
print(json.dumps({
    "python": platform.python_version(), "glibc": "-".join(platform.libc_ver()), "platform": platform.platform(),
    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda, "gpus": gpus,
    "bf16_supported": cuda and torch.cuda.is_bf16_supported(), "nvidia_smi": smi,
}))
"""
UNZIP = "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]"
IMPORTS = """
import sys
import cluster.llm, cluster.runtime.local, cluster.bench.engine, cluster.cli, transformers, pytest
print("imported; transformers", transformers.__version__, "; ray loaded:", "ray" in sys.modules)
"""


@dataclass
class Check:
    """One run of the check: where it writes, its deadline and the report it builds."""

    out: Path
    wheels: Path
    site: Path
    deadline: float
    rehearse: bool
    bench_args: str | None
    report: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The children's environment: this repo and the installed wheels first on the path, Hugging Face offline."""
        path = [str(REPO), str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])]
        extra = {"PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        return {**os.environ, **extra, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def step(self, name: str, cmd: list[str], shown: str | None = None) -> dict[str, Any]:
        """Run ``cmd`` (in the repo) as step ``name`` within its limit and what is left of the budget; its full
        output goes to ``<out>/<name>.log``, its record (also returned) into the report's ``steps``, with ``cmd``
        written as ``shown`` when given."""
        limit = min(STEP_LIMIT_S[name], self.deadline - time.monotonic() - MARGIN_S)
        record: dict[str, Any] = {"name": name, "cmd": shown or shlex.join(cmd), "limit_s": round(limit, 1)}
        if limit < 5:  # a check that could not finish has failed
            return self.skip(name, "out of time: the check's budget is spent", ok=False)
        print(f"[gpu-check] {name}: {record['cmd']}", flush=True)
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=limit)
            rc, output, timed_out = done.returncode, done.stdout + done.stderr, False
        except subprocess.TimeoutExpired as e:
            rc, timed_out = None, True
            output = "".join(
                x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
            )
        record.update(rc=rc, ok=rc == 0, timed_out=timed_out, seconds=round(time.monotonic() - t0, 1))
        record["output_tail"] = output[-TAIL_CHARS:]
        (self.out / f"{name}.log").write_text(output)
        print(f"[gpu-check] {name}: {'ok' if rc == 0 else 'FAILED'} (rc {rc}, {record['seconds']} s)", flush=True)
        self.report.setdefault("steps", []).append(record)
        return record

    def skip(self, name: str, reason: str, ok: bool | None = None) -> dict[str, Any]:
        """Record step ``name`` as skipped, with the reason (``ok`` None: a skip that fails nothing)."""
        print(f"[gpu-check] {name}: skipped ({reason})", flush=True)
        record = {"name": name, "skipped": True, "reason": reason, "ok": ok}
        self.report.setdefault("steps", []).append(record)
        return record


def info(check: Check) -> dict[str, Any]:
    """Step 1: the machine, torch and the GPU as a child Python sees them (``{}`` when torch does not import)."""
    record = check.step("info", [sys.executable, "-c", INFO], f"{sys.executable} -c INFO (gpu_check.py)")
    lines = record.get("output_tail", "").strip().splitlines()
    if not record["ok"] or not lines:
        return {}
    found = json.loads(lines[-1])
    check.report["info"] = found
    return found


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them (``Pydantic_Core`` and ``pydantic-core`` are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_wheels(folder: Path, site: Path) -> tuple[list[Path], list[str]]:
    """The wheels in ``folder`` whose distribution neither this Python nor ``site`` has, and ``name version`` of
    those already there."""
    here = {normalized(d.metadata["Name"] or ""): d.version for d in distributions(path=[*sys.path, str(site)])}
    need, have = [], []
    for wheel in sorted(folder.glob("*.whl")):
        dist = normalized(wheel.name.split("-")[0])
        if dist in here:
            have.append(f"{dist} {here[dist]}")
        else:
            need.append(wheel)
    return need, have


def install(check: Check) -> None:
    """Step 2: ``pip install --no-index --no-deps --target <site>`` of the carried wheels this Python lacks (where
    this Python has no pip: the wheels unzipped there, which is all pip does for these)."""
    if not any(check.wheels.glob("*.whl")):
        check.skip("install", f"no wheels in {check.wheels} (make gpu-wheels, then carry that folder)")
        return
    need, have = missing_wheels(check.wheels, check.site)
    check.report["wheels"] = {"installed": [w.name for w in need], "already_here": have}
    if not need:
        check.skip("install", "this Python has every carried distribution already")
        return
    if importlib.util.find_spec("pip") is None:
        cmd = [sys.executable, "-c", UNZIP, str(check.site)]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--upgrade", "--target", str(check.site), "--find-links", str(check.wheels)]
    shown = f"{shlex.join(cmd)} <{len(need)} wheels: report's wheels.installed>"
    check.step("install", [*cmd, *map(str, need)], shown)


def pytest_counts(junit: Path) -> dict[str, Any]:
    """Outcome counts of a JUnit XML file, and each failure's test id and message (its first 1000 characters)."""
    if not junit.is_file():
        return {"junit": None}
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            test = f"{case.get('classname')}::{case.get('name')}"
            failed.append({"test": test, "message": (bad.get("message") or bad.text or "")[:1000]})
    return {**counts, "failed": failed, "junit": junit.name}


def run_pytest(check: Check) -> None:
    """Step 4: the gpu tests, with JUnit XML; their counts go into the report's ``pytest``."""
    junit = check.out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-p", "no:cacheprovider", "-q", "-rA"]
    record = check.step("pytest", [*cmd, f"--junitxml={junit}"])
    # pytest's last line: "3 passed, 1 skipped in 12.34s" (-q), or the same between "=" signs
    summary = re.findall(r"^[= ]*(\d+ \w+.* in [\d.]+s\b.*?)[= ]*$", record.get("output_tail", ""), flags=re.M)
    check.report["pytest"] = {**pytest_counts(junit), "summary": summary[-1] if summary else None}


def run_bench(check: Check, cuda: bool) -> None:
    """Step 5: the W = 0 engine bench (bf16 on CUDA; float32 on the CPU when rehearsing); its JSON into the report."""
    bench_json = check.out / "bench-engine.json"
    device = ["--device", "cuda", "--dtype", "bfloat16"] if cuda else ["--device", "cpu", "--dtype", "float32"]
    sizes = shlex.split(check.bench_args if check.bench_args is not None else BENCH_CUDA if cuda else BENCH_REHEARSAL)
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "engine", *device, *sizes, "--out", str(bench_json)]
    check.step("bench", cmd)
    check.report["bench"] = json.loads(bench_json.read_text()) if bench_json.is_file() else None


def out_dir(given: Path | None) -> Path:
    """``--out``, else ``$OUT`` (the device tool's folder), else ``gpu-check-results/`` in the repo."""
    env = os.environ.get("OUT")
    return given or (Path(env) if env else REPO / "gpu-check-results")


def save(check: Check, started: float) -> Path:
    """Write the report as it stands (after every step, so a check cut short still leaves one)."""
    steps = check.report.get("steps", [])
    check.report["ok"] = all(s["ok"] is not False for s in steps)
    check.report["seconds"] = round(time.monotonic() - started, 1)
    path = check.out / REPORT
    path.write_text(json.dumps(check.report, indent=2, default=str) + "\n")
    return path


def run_check(check: Check) -> Path:
    """Steps 1-5 (see the module docstring), the report saved after each; returns the report's path."""
    started = time.monotonic()
    check.report.update(created=datetime.now().astimezone().isoformat(timespec="seconds"), rehearse=check.rehearse)
    found = info(check)
    cuda = bool(found.get("cuda_available"))
    check.report["cuda"] = cuda
    save(check, started)
    install(check)
    save(check, started)
    if not found:
        reason = "torch did not import (see info.log)"
    elif not cuda and not check.rehearse:
        reason = "no CUDA: torch.cuda.is_available() is False here (--rehearse runs these steps on the CPU)"
    else:
        reason = None
    if reason:
        for name in ("imports", "pytest", "bench"):
            check.skip(name, reason)
        return save(check, started)
    check.step("imports", [sys.executable, "-c", IMPORTS], f"{sys.executable} -c IMPORTS (gpu_check.py)")
    save(check, started)
    run_pytest(check)
    save(check, started)
    run_bench(check, cuda)
    return save(check, started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels", help="the carried wheels (make gpu-wheels)")
    p.add_argument("--site", type=Path, default=REPO / "gpu-check-site", help="where the missing wheels go")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else gpu-check-results)")
    p.add_argument("--budget-s", type=float, default=470.0, help="seconds for every step together (default: 470)")
    p.add_argument("--rehearse", action="store_true", help="without CUDA, run every step anyway, on the CPU")
    p.add_argument("--bench-args", default=None, help="the bench's sizes instead of BENCH_CUDA ('': its defaults)")
    a = p.parse_args(argv)
    out = out_dir(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.budget_s
    check = Check(out, a.wheels.resolve(), a.site.resolve(), deadline, a.rehearse, a.bench_args)
    path = run_check(check)
    steps = check.report["steps"]
    print(f"[gpu-check] {'ok' if check.report['ok'] else 'FAILED'} in {check.report['seconds']} s; report: {path}")
    for s in steps:
        state = "skipped: " + s["reason"] if s.get("skipped") else "ok" if s["ok"] else "FAILED"
        state += " (timed out)" if s.get("timed_out") else ""
        print(f"[gpu-check]   {s['name']:8} {state}")
    if "pytest" in check.report:
        print(f"[gpu-check] pytest: {check.report['pytest'].get('summary')}")
    return 0 if check.report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
