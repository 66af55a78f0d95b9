"""Starting a local Ray sized for what mixserve will place on it (the offline API and ``mixserve serve`` alike).

Ray counts logical CPUs, and a 2-core laptop would refuse a frontend plus two workers (3 CPUs). A Ray started
here offers ``max(cores, what the actors ask for + extra)`` logical CPUs; the actors then share the cores, with
torch threads sized from their own Ray CPUs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ray

from cluster.config.parallel import ParallelConfig


def cpus_needed(parallel: ParallelConfig, *, extra: float = 0.0) -> int:
    """Logical CPUs for the frontend, the workers and ``extra`` (e.g. the Serve ingress and proxies)."""
    return math.ceil(parallel.frontend_cpus + parallel.expert_workers * parallel.cpus_per_worker + extra)


def start_local_ray(parallel: ParallelConfig, *, extra_cpus: float = 0.0, **init: Any) -> None:
    """A new local Ray instance (never a ``ray start`` cluster that happens to run here) with room for the
    actors of ``parallel``; ``init``: more ``ray.init`` arguments."""
    cpus = max(os.cpu_count() or 1, cpus_needed(parallel, extra=extra_cpus))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **init)
