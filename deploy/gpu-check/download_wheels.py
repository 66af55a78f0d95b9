"""Download the wheels the GPU check carries to the lent GPU box (``make gpu-wheels``).

The box is offline and has only torch, transformers, safetensors, sentencepiece and numpy; the device tool carries
the working tree plus a few gitignored paths, 64 MiB in all. This script downloads every distribution pinned in
``wheels.txt`` (beside it) as a CPython 3.12 manylinux x86_64 wheel, each with ``--no-deps`` so that nothing heavy
(torch, Ray) comes along, into ``gpu-wheels/`` (gitignored), after emptying it of older wheels. It prints each
wheel's size and the total, and exits 1 when the total exceeds the limit (64 MiB) or pip fails.

    python3 deploy/gpu-check/download_wheels.py [--dest gpu-wheels] [--python-version 3.12] [--limit-mib 64]

Then run the check on the box through the device tool, carrying ``gpu-wheels``: ``make gpu-check`` (see
``gpu_check.py``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "wheels.txt"
MIB = 1024 * 1024
# Every manylinux tag up to glibc 2.31, each named (pip takes a --platform literally): llguidance's wheels since 1.7
# are built for glibc 2.31 only (torch 2.11's own need 2.28). The check's report gives the box's glibc.
PLATFORMS = tuple(f"manylinux_2_{v}_x86_64" for v in (17, 24, 27, 28, 31)) + ("manylinux2014_x86_64",)


def download(dest: Path, python_version: str) -> None:
    """``pip download`` of every pin in wheels.txt into ``dest``: binary wheels only, no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    cmd += ["--abi", "cp" + python_version.replace(".", "")]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["-r", str(REQUIREMENTS), "-d", str(dest)]
    subprocess.run(cmd, check=True)


def sizes(dest: Path) -> list[tuple[str, int]]:
    """(file name, bytes) of every wheel in ``dest``, largest first."""
    wheels = [(w.name, w.stat().st_size) for w in dest.glob("*.whl")]
    return sorted(wheels, key=lambda x: -x[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--dest", type=Path, default=Path("gpu-wheels"), help="where the wheels go (default: gpu-wheels)")
    p.add_argument("--python-version", default="3.12", help="the box's Python (default: 3.12)")
    p.add_argument("--limit-mib", type=float, default=64.0, help="the most the wheels may weigh (default: 64)")
    a = p.parse_args(argv)
    a.dest.mkdir(parents=True, exist_ok=True)
    for old in a.dest.glob("*.whl"):
        old.unlink()
    try:
        download(a.dest, a.python_version)
    except subprocess.CalledProcessError as e:
        print(f"download_wheels: pip download failed (exit {e.returncode})", file=sys.stderr)
        return 1
    wheels = sizes(a.dest)
    total = sum(n for _, n in wheels)
    for name, n in wheels:
        print(f"{n / MIB:8.2f} MiB  {name}")
    print(f"{total / MIB:8.2f} MiB  total, {len(wheels)} wheels in {a.dest} (limit {a.limit_mib:g} MiB)")
    if total > a.limit_mib * MIB:
        print(f"download_wheels: {total / MIB:.2f} MiB is over the {a.limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
