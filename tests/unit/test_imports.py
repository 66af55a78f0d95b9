"""What each process imports: parsing a config needs neither torch nor Ray (the CLI, the ingress), and the ingress
side of the Serve application imports no model code. Checked in a fresh interpreter, as a process starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


def imported(*modules: str) -> set[str]:
    """Every module a fresh interpreter holds after importing ``modules``."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(done.stdout))


def under(mods: set[str], *roots: str) -> list[str]:
    return sorted(m for m in mods if any(m == r or m.startswith(r + ".") for r in roots))


def test_the_config_imports_neither_torch_nor_ray():
    mods = imported("cluster.config", "cluster.config.cluster", "cluster.config.serving", "cluster.config.options")
    assert under(mods, "torch", "ray", "safetensors", "workers", "router") == []
    from cluster.config.serving import parse_args

    assert parse_args({"expert_workers": 3}).cluster_config().parallel.expert_workers == 3


def test_the_ingress_imports_no_model_code():
    mods = imported("cluster.serve.ingress.deployment")
    assert under(mods, "workers", "router", "cluster.runtime", "cluster.llm", "cluster.serve.frontend") == []
    assert "cluster.serve.ingress.deployment" in mods  # it did import (with Ray Serve)
