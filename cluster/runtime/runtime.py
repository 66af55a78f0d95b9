"""The frontend runtime: what one frontend process runs, offline and in Serve alike (:class:`FrontendRuntime`).

    FrontendRuntime
      pool      ExpertPool          W expert-worker actors in a placement group (None: W = 0, experts in-process)
      client    ExpertClient        routing over the copies of experts + the transport from the registry
      frontend  Frontend            tokenizer, non-expert model, KV cache, engine (cluster.runtime.frontend)

It starts the pool (the workers load their own experts), builds the client in this process (a channel graph or an
RDT group must be driven from here) and the frontend; :meth:`health` asks every worker at once; :meth:`heal`
replaces workers Ray will not restart and moves the client over to them. The offline API's frontend actor
(``cluster.runtime.actor``) and the Serve frontend replica (``cluster.serve.frontend``) each hold one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.runtime.frontend import Frontend, build_frontend
from cluster.runtime.resources import expert_placement
from cluster.runtime.transports import expert_client

log = logging.getLogger("mixserve")


class FrontendRuntime:
    """Workers + expert client + frontend + health + heal, for one frontend process (see the module docstring).

    With ``pool_owner`` (a :class:`~cluster.runtime.pool_owner.PoolOwner`'s actor or Serve deployment handle) it
    attaches to that shared pool as ``frontend`` instead of starting its own; without, it starts (and owns) one:
    ``name_prefix``: the workers are then the named actors ``<prefix><w>``. W = 0 needs no Ray at all. The actor that
    hosts a runtime sizes its torch threads from its Ray CPUs (``workers.expert_worker.use_assigned_cpus``)."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        name_prefix: str | None = None,
        pool_owner: Any = None,
        frontend: str = "frontend",
        progress: bool = True,
    ) -> None:
        self.config = config = resolve(config)
        self.pool: Any = None  # cluster.runtime.pool.ExpertPool or AttachedPool (they import Ray) when W >= 1
        self._healing = threading.Lock()
        client = None
        if pool_owner is not None:
            from cluster.runtime.pool import AttachedPool
            from cluster.runtime.pool_owner import pool_options

            self.pool = AttachedPool(pool_owner, frontend, pool_options(config))
            client = self._client(self.pool.handles)
        elif config.parallel.expert_workers > 0:
            from cluster.runtime.pool import ExpertPool  # Ray: only for expert workers

            assert config.load.model is not None
            placement = expert_placement(config.parallel, ModelConfig.from_dir(config.load.model))
            self.pool = ExpertPool.launch(config, placement, name_prefix=name_prefix)
            client = self._client(self.pool.handles)
        try:
            self.frontend: Frontend = build_frontend(config, experts=client, progress=progress)
        except BaseException:
            self.close()
            raise

    def _client(self, handles: list[Any]) -> Any:
        import ray

        assert self.pool is not None
        gpus = float(ray.cluster_resources().get("GPU", 0))
        return expert_client(self.config, self.pool.placement, handles, total_gpus=gpus)

    @property
    def workers(self) -> int:
        return 0 if self.pool is None else len(self.pool.handles)

    def expert_transport(self) -> Any:
        """The transport the frontend's client drives (transport host hooks reach it through this)."""
        return self.frontend.experts.transport

    def health(self, timeout_s: float = 3.0) -> dict:
        """``ok``, one entry per worker (its load time and pid, or the error; ``dead`` when Ray will not restart
        it; ``routed_around`` when this frontend leaves it out: it failed or answered a layer late) and
        ``missing_experts`` ([layer, expert] with no live copy); in-process experts are always there."""
        if self.pool is None:
            return {"ok": True, "workers": [], "missing_experts": []}
        report = self.pool.health(timeout_s)
        self.frontend.experts.take_back()
        down = self.frontend.experts.down  # left out of routing here: failed or late, until they answer again
        for w in report["workers"]:
            w["routed_around"] = w["worker"] in down
        return report

    def placement(self, timeout_s: float = 10.0) -> list[dict]:
        """Per worker: its experts, node, GPUs, pid and expert bytes (or its share and the error)."""
        if self.pool is None:
            info = self.frontend.info()
            return [{"worker": "in-process", "experts": "all", "node_id": None, "gpu_ids": [],
                     "expert_bytes": info["expert_bytes"]}]  # fmt: skip
        return self.pool.info(timeout_s)

    def heal(self, timeout_s: float = 30.0) -> list[str]:
        """Replace the workers Ray will not restart (in their bundles) and route later layers to them over a new
        transport; wait for restarting ones up to ``timeout_s``. Returns what was replaced. One heal at a time."""
        if self.pool is None:
            return []
        with self._healing:
            replaced = self.pool.replace_dead(timeout_s)
            if replaced:
                client = self.frontend.experts
                new = self._client(self.pool.handles).transport
                with contextlib.suppress(Exception):
                    new.connect()
                client.replace_transport(new).close()
                log.warning("expert workers %s were gone for good and were replaced", replaced)
        return [f"worker {w}" for w in replaced]

    def close(self) -> None:
        """Release the transport (a compiled graph goes before its actors), then the workers and their group (an
        attached pool: detach from it; its workers stay up)."""
        frontend = getattr(self, "frontend", None)
        if frontend is not None:
            with contextlib.suppress(Exception):
                frontend.experts.close()
        if self.pool is not None:
            self.pool.shutdown()
