"""The soak benchmark's memory arithmetic and process discovery (the load itself runs only as a benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.bench.soak import MB, descendants, growth


def test_growth_compares_the_end_with_the_end_of_warm_up():
    samples = [(t, {"A:1": (100 + (t >= 60) * 10 + t // 100) * MB, "B:2": 50 * MB}) for t in range(0, 1000, 10)]
    rows = {r["process"]: r for r in growth(samples, warmup_s=60)}
    a = rows["A:1"]
    assert a["rss_start_mb"] == pytest.approx(110) and a["rss_end_mb"] == pytest.approx(119)
    assert a["growth_pct"] == pytest.approx(100 * 9 / 110)
    assert rows["B:2"]["growth_pct"] == 0 and rows["B:2"]["samples"] == 94


def test_descendants_finds_grandchildren():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])",
        ]
    )
    try:
        for _ in range(200):
            found = descendants(os.getpid())
            if child.pid in found and len(found) >= 2:
                break
            subprocess.run(["sleep", "0.05"])
        assert child.pid in found and len(found - {child.pid}) >= 1
    finally:
        for pid in descendants(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()
