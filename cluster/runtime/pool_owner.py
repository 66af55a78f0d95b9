"""One expert pool per application, owned by neither of its frontends (:class:`PoolOwner`).

    PoolOwner (a Serve deployment of its own, or a named actor offline)
      owns: the placement group and W expert workers (x expert_replicas copies of every expert)
      attach(frontend, options) -> the workers' handles and the placement plan; detach(frontend)
           ^                    ^                     ^
      frontend 1           frontend 2    ...     frontend M       each calls the workers directly, per layer

Frontends attach on start and detach on stop; a frontend's death or restart never restarts, reloads or duplicates a
worker. The owner checks that an attaching frontend matches the pool (:data:`MUST_MATCH`) and replaces a worker Ray
will not restart (frontends re-attach to get its new handle); each frontend asks the workers for their health
itself. The workers die with the owner: the Serve app deleted; offline, once the ``LLM`` that started it and every
``LLM`` attached to it have shut down (or the driver process that started it exits: the owner actor is its).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.dtype import resolve_dtype
from cluster.config.model import ModelConfig
from cluster.errors import SetupError
from cluster.runtime.pool import ExpertPool, cluster_resources
from cluster.runtime.resources import expert_placement

log = logging.getLogger("mixserve")

POOL_DEPLOYMENT = "ExpertPool"  # the Serve deployment that owns a pool (cluster.serve.app)

# The options that shape a pool; a frontend-only change (engine limits, KV cache, serving) leaves the pool alone.
POOL_PARTS = ("load", "parallel")
# What a frontend and the pool it attaches to must agree on (the experts' source, form and dtype, and where they are)
MUST_MATCH = ("model", "quantization", "dtype", "expert_workers", "expert_replicas", "expert_placement")


def pool_options(config: ClusterConfig) -> dict[str, Any]:
    """The options of ``config`` that its pool is made of (``POOL_PARTS``), flat."""
    return {k: v for part in POOL_PARTS for k, v in getattr(config, part).model_dump().items()}


def mismatch(pool: dict[str, Any], frontend: dict[str, Any]) -> str | None:
    """Why a frontend of options ``frontend`` cannot use a pool of options ``pool`` (``MUST_MATCH``), or None.

    >>> mismatch({"model": "/a", "expert_workers": 2}, {"model": "/b", "expert_workers": 2})
    "model: the pool's is '/a', this frontend's '/b'"
    """
    diff = [f"{k}: the pool's is {pool.get(k)!r}, this frontend's {frontend.get(k)!r}"
            for k in MUST_MATCH if pool.get(k) != frontend.get(k)]  # fmt: skip
    if any(d.startswith("dtype:") for d in diff):
        diff.append("dtype auto resolves for each process's device: set the same dtype on the pool and the frontends")
    return "; ".join(diff) or None


class PoolOwner:
    """Starts the pool when created (the workers load their experts) and keeps it until it is closed."""

    def __init__(self, options: dict[str, Any], *, name: str | None = None) -> None:
        config = ClusterConfig.from_options(options)
        if config.load.dtype == "auto" and cluster_resources(config).gpus_per_worker:
            # auto means what the workers' device runs, not this process's (which holds no GPU)
            folder = resolve(config).load.model
            assert folder is not None
            config = config.with_options(dtype=resolve_dtype("auto", folder, "cuda"))
        config = resolve(config)
        assert config.load.model is not None
        self.config = config
        self.options = pool_options(config)
        tag = uuid.uuid4().hex[:8]
        self.name = name or f"mixserve-pool-{tag}"
        placement = expert_placement(config.parallel, ModelConfig.from_dir(config.load.model))
        # workers named mixserve-expert-<tag>-<w> (operators and tests find them so), their group ...-pg
        self.pool = ExpertPool.launch(config, placement, name_prefix=f"mixserve-expert-{tag}-")
        self._frontends: dict[str, float] = {}  # attached frontend -> when it attached
        self._lock = threading.Lock()
        self._released = False  # the one who started it is done: close once no frontend is attached
        self._closed = False
        log.info("expert pool %s ready: %d workers, %d copies of each expert", self.name, len(self.pool.handles),
                 placement.replicas)  # fmt: skip

    def attach(self, frontend: str, options: dict[str, Any]) -> dict[str, Any]:
        """What a frontend needs to reach the workers: their handles (worker id = index) and the placement plan.
        ``options``: the frontend's (``pool_options``); a frontend that does not match the pool is refused
        (:class:`SetupError` naming the options)."""
        why = mismatch(self.options, options)
        if why is not None:
            raise SetupError(f"frontend {frontend} cannot attach to expert pool {self.name}: {why}")
        with self._lock:
            self._frontends[frontend] = time.time()
        log.info("frontend %s attached to expert pool %s (%d attached)", frontend, self.name, len(self._frontends))
        return {"handles": list(self.pool.handles), "placement": self.pool.placement, "pool": self.name}

    def detach(self, frontend: str) -> None:
        """A frontend leaves; the last one to leave a released pool closes it."""
        with self._lock:
            self._frontends.pop(frontend, None)
            last = self._released and not self._frontends
        if last:
            self.close()

    def release(self) -> bool:
        """The offline ``LLM`` that started the pool is done with it: close it now when no frontend is attached
        (True: the caller may kill this owner), else when the last one detaches (False)."""
        with self._lock:
            self._released = True
            idle = not self._frontends
        if idle:
            self.close()
        return idle

    def finished(self) -> bool:
        """Released and closed (the last ``LLM`` to leave kills this owner then)."""
        return self._closed

    def replace_dead(self, timeout_s: float = 30.0) -> list[int]:
        """Replace the workers Ray will not restart; attached frontends re-attach for their new handles."""
        with self._lock:
            return self.pool.replace_dead(timeout_s)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.pool.shutdown()
