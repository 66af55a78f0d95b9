"""The lent GPU box has no Ray: the in-process (W = 0) path and ``mixserve bench engine`` must work without it, and
``make gpu-check`` (deploy/gpu-check/gpu_check.py) must skip cleanly, still writing its report, where there is no
CUDA.

The Ray-less checks run in a child Python whose first act is to make ``import ray`` (and ``ray.*``) fail as on a
machine without it, before anything else is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "deploy" / "gpu-check" / "gpu_check.py"

NO_RAY = r'''
import contextlib, importlib.abc, io, json, sys

class NoRay(importlib.abc.MetaPathFinder):
    """``import ray`` fails as where Ray is not installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoRay())
result = {}

import cluster.llm, cluster.runtime.local, cluster.bench.engine, cluster.cli  # the W = 0 modules

def cli(*argv):
    """(exit status, stdout, stderr) of ``mixserve *argv``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cluster.cli.main(list(argv))
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()

result["bench_engine_help"] = cli("bench", "engine", "--help")
result["help"] = cli("--help")
result["serve"] = cli("serve")
result["bench_dispatch"] = cli("bench", "dispatch", "--workers", "1")

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model

write_tiny_model(sys.argv[1], TinyModelSpec(hidden=32, intermediate=64, layers=1, experts=4))
with LLM(sys.argv[1], expert_workers=0, progress=False) as llm:
    (out,) = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
result["generated"] = out.token_ids
result["ray_modules"] = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def without_ray(tmp_path_factory) -> dict:
    """What the child without Ray saw (``NO_RAY``)."""
    folder = tmp_path_factory.mktemp("no-ray-model")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MIXSERVE_CACHE": str(folder / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(folder / "tiny")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_w0_modules_and_generate_never_import_ray(without_ray):
    assert len(without_ray["generated"]) == 4
    assert without_ray["ray_modules"] == []


def test_bench_engine_help_without_ray(without_ray):
    rc, out, _ = without_ray["bench_engine_help"]
    assert rc == 0 and "--hf-experts-implementation" in out and "--dtype" in out
    rc, out, _ = without_ray["help"]  # every command is still listed
    assert rc == 0 and all(name in out for name in ("tiny-model", "generate", "serve", "bench"))


def test_ray_commands_say_they_need_ray(without_ray):
    for key, prog in (("serve", "mixserve serve"), ("bench_dispatch", "mixserve bench dispatch")):
        rc, _, err = without_ray[key]
        assert rc == 2 and err.startswith(f"{prog}: needs Ray"), err


def load_gpu_check() -> ModuleType:
    """The script as a module (registered first: its dataclass looks itself up in ``sys.modules``)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_gpu_check_without_cuda_skips_and_writes_its_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(out)}
    cmd = [sys.executable, str(GPU_CHECK), "--wheels", str(tmp_path / "no-wheels"), "--site", str(tmp_path / "site")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["ok"] is True and report["cuda"] is False
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["info", "install", "imports", "pytest", "bench"]
    assert steps["info"]["ok"] is True and report["info"]["cuda_available"] is False and report["info"]["torch"]
    assert steps["install"]["skipped"] and "no wheels" in steps["install"]["reason"]
    for name in ("imports", "pytest", "bench"):
        assert steps[name]["skipped"] and steps[name]["reason"].startswith("no CUDA"), steps[name]
    assert "no CUDA" in done.stdout and not (tmp_path / "site").exists()


def test_gpu_check_counts_junit_outcomes(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.gpu.a" name="test_ok"/>'
        '<testcase classname="tests.gpu.a" name="test_bad"><failure message="assert 1 == 2">...</failure></testcase>'
        '<testcase classname="tests.gpu.b" name="test_s1"><skipped/></testcase>'
        '<testcase classname="tests.gpu.b" name="test_s2"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = load_gpu_check().pytest_counts(junit)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == (4, 1, 1, 2)
    assert counts["failed"] == [{"test": "tests.gpu.a::test_bad", "message": "assert 1 == 2"}]


def test_gpu_check_installs_only_what_this_python_lacks(tmp_path):
    for name in ("pytest-9.0.0-py3-none-any.whl", "Not_Here_Anywhere-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    need, have = load_gpu_check().missing_wheels(tmp_path, tmp_path / "site")
    assert [w.name for w in need] == ["Not_Here_Anywhere-1.0-py3-none-any.whl"]
    assert [h.split()[0] for h in have] == ["pytest"]
