"""The expert-worker Ray actor: one worker's experts of every layer, loaded by the worker itself.

Wrapped with ``ray.remote`` by :mod:`cluster.runtime.pool` (a threaded actor: it takes the calls of every frontend
attached to its pool at once, and runs the layer messages waiting together as one batch: ``workers.merge``). The
constructor takes the checkpoint path and the worker's share, never weights, so Ray can restart a dead worker and it
reloads exactly its experts.

Restart cost: the worker times its own load (``load_seconds``, bytes, MB/s), logs one line on stderr (Ray's worker
log) and reports it through :meth:`ExpertWorker.status`, which the frontend's health check reads (``/health``,
``/metrics``).

Threads: torch's intra-op pool is sized from the CPUs Ray gave this actor (at least one), so W workers on one node
share its cores instead of each starting one thread per core.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np
import ray
import torch

from cluster.config.model import ModelConfig
from cluster.config.quantization import OnLoad
from cluster.errors import ExpertWorkerError
from router import wire
from workers.expert import ExpertShard
from workers.merge import LayerMerger

log = logging.getLogger("mixserve.worker")


class ExpertWorker:
    """Serves one layer's message for the experts it holds: :meth:`run_packed` (the message as one packed buffer,
    ``router.wire``: over actor calls and compiled-graph channels) or :meth:`run` (torch tensors: RDT, and timing
    the compute alone); ``echo`` is the dispatch benchmark's floor (same payload in and out, no compute)."""

    def __init__(
        self,
        *,
        model: str,
        worker: int,
        experts: list[tuple[int, int]],
        dtype: str = "float32",
        progress: bool = False,
        quantization: OnLoad | None = None,
        merge: bool = True,
    ) -> None:
        ctx = ray.get_runtime_context()
        self.worker = worker
        self.gpu_ids = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        self.device = "cuda" if self.gpu_ids and torch.cuda.is_available() else "cpu"
        self.node_id = ctx.get_node_id()
        self.pid = os.getpid()
        # This process's identity: a worker Ray restarts is a new process with a new one. The object-ref transport
        # sends the one it expects with each layer (run_packed), so a layer never silently reaches a restarted worker.
        self.incarnation = uuid.uuid4().hex
        self.compute_log: deque[tuple[float, float]] = deque(maxlen=65536)  # (start, seconds) of each packed run
        self.threads = use_assigned_cpus()
        config = ModelConfig.from_dir(model)
        # this process's runtime baseline (torch and mixserve imported, no experts): all of it, and what it allocated
        self.rss_before_load, self.anon_rss_before_load = rss_bytes(), rss_bytes("RssAnon")
        t0 = time.perf_counter()
        self.shard = ExpertShard.load(
            model,
            config,
            experts,
            dtype=dtype,
            device=self.device,
            progress=progress,
            label=f"worker {worker}",
            quantization=quantization,
        )
        self.load_seconds = time.perf_counter() - t0
        self.started_at = time.time()
        # Layer messages of several frontends waiting together run as one (workers.merge): one thread computes.
        # merge=False (a transport whose workers serve one frontend, e.g. a compiled graph): computed in the call
        self.merger = LayerMerger(self._compute) if merge else None
        _log_to_stderr()
        mb = self.shard.nbytes() / 1e6
        log.info(
            "expert worker %d (pid %d, %s): loaded %d experts, %.1f MB in %.2f s (%.0f MB/s)",
            worker,
            self.pid,
            self.device,
            len(experts),
            mb,
            self.load_seconds,
            mb / max(self.load_seconds, 1e-9),
        )

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        rows: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        sender: str | None = None,
    ) -> torch.Tensor:
        """One layer's message: x [N, D] -> weighted expert outputs [N, D] (see :meth:`ExpertShard.run`), computed
        together with the same layer's messages of other frontends that wait beside it (:class:`LayerMerger`;
        ``sender``: the frontend's transport, whose pace the merger's gather window learns)."""
        d = self.device
        if self.merger is None:
            return self._compute(layer, x.to(d), rows.to(d), experts.to(d), weights.to(d))
        return self.merger.submit(layer, x.to(d), rows.to(d), experts.to(d), weights.to(d), sender)

    def _compute(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """One run of the experts (on the merger's thread), timed for the benchmarks' compute log."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.shard.run(layer, x, rows, experts, weights)
        self.compute_log.append((t0, time.perf_counter() - t0))
        return out

    def run_packed(
        self, buf: np.ndarray | None, incarnation: str | None = None, sender: str | None = None
    ) -> np.ndarray | None:
        """One layer's message packed by ``router.wire`` -> the partial output [N, D] as raw bytes; None (no rows
        for this worker) -> None.

        ``incarnation``: the process the caller expects (:meth:`status`); when this is another one (Ray restarted
        the worker since), :class:`ExpertWorkerError` instead of an answer: the process that served the caller's
        earlier layers died. None (the channel transport, whose graph dies with the process): no check."""
        if incarnation is not None and incarnation != self.incarnation:
            raise ExpertWorkerError(
                f"expert worker {self.worker} was restarted (now pid {self.pid}): the process that served the "
                "earlier layers died",
                worker=self.worker,
            )
        if buf is None:
            return None
        m = wire.unpack(buf)
        if m.echo:
            return wire.pack_rows(m.x)
        return wire.pack_rows(self.run(m.layer, m.x, m.rows, m.experts, m.weights, sender))

    def take_compute_log(self) -> list[tuple[float, float]]:
        """(perf_counter start, seconds) of each expert run since the last call (benchmarks: on one node the
        clock is the same in every process)."""
        log = list(self.compute_log)
        self.compute_log.clear()
        return log

    def echo(
        self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Same payload in and out as :meth:`run`, no compute."""
        return x

    def info(self) -> dict:
        return {
            "worker": self.worker,
            "experts": self.shard.experts,
            "node_id": self.node_id,
            "gpu_ids": self.gpu_ids,
            "device": self.device,
            "expert_bytes": self.shard.nbytes(),
            "expert_format": self.shard.describe(),
            "rss_bytes": rss_bytes(),
            "rss_before_load": self.rss_before_load,
            "anon_rss_bytes": rss_bytes("RssAnon"),
            "anon_rss_before_load": self.anon_rss_before_load,
            "pid": self.pid,
            "incarnation": self.incarnation,
            "threads": self.threads,
            "actor_name": ray.get_runtime_context().get_actor_name(),
        }

    def ping(self) -> bool:
        return True

    def status(self) -> dict:
        """What the health check reports: load time of this incarnation, its pid, identity and start time."""
        return {
            "load_seconds": self.load_seconds,
            "loaded_bytes": self.shard.nbytes(),
            "pid": self.pid,
            "incarnation": self.incarnation,
            "started_at": self.started_at,
            "merge": None if self.merger is None else self.merger.stats.as_dict(),
        }


def _log_to_stderr() -> None:
    """Send this module's INFO lines to stderr once (a Ray worker's root logger is unconfigured)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from /proc/self/status: VmRSS (all of it), RssAnon (what it allocated, without
    the pages of files and libraries it maps); 0 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def use_assigned_cpus() -> int:
    """Set this actor's torch threads to its Ray CPUs (:func:`cpu_threads`), so the actors on a node do not
    oversubscribe its cores; returns the count."""
    threads = cpu_threads(ray.get_runtime_context().get_assigned_resources())
    torch.set_num_threads(threads)
    return threads


def cpu_threads(assigned: dict[str, float]) -> int:
    """Torch threads for an actor's Ray resources: its CPUs rounded down, at least 1. Inside a placement group Ray
    names the bundle's CPUs ``CPU_group_<i>_<pg>`` / ``CPU_group_<pg>`` besides (or instead of) ``CPU``."""
    cpus = assigned.get("CPU")
    if cpus is None:
        group = [v for k, v in assigned.items() if k.startswith("CPU_group_") and k.count("_") == 2]
        cpus = group[0] if group else 1.0
    return max(1, math.floor(cpus))
