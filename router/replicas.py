"""Which worker gets each expert's rows in a layer, and failover between copies of experts: :class:`ReplicaRouter`.

With one copy of every expert (``placement.replicas`` R = 1) each expert has one worker, and a worker that fails
a layer fails the step. With R > 1 each layer's rows go to one live copy per expert, the routed tokens balanced
over the copies (:func:`router.dispatch.choose_replicas`); a worker that fails a layer is left out (``down``) and
the client sends the whole layer again to the other copies within the same step; the transport says when a left-out
worker answers again (``Transport.readmit``) and it is routed to again.

Shapes: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from cluster.errors import ExpertWorkerError, ExpertWorkerLate
from router import dispatch
from router.dispatch import WorkerMessage
from router.gate import Routing
from router.placement import ExpertPlacement

log = logging.getLogger("mixserve")


class ReplicaRouter:
    """Plans each layer's messages over the live copies of its experts; counts failovers."""

    def __init__(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        # [E] int64 per layer: the (primary) worker of each expert
        self._worker_of_expert = [placement.worker_tensor(i) for i in range(placement.num_layers)]
        # [L][E]: the workers holding each expert (primary first)
        self._holders = [
            [placement.holders(layer, e) for e in range(placement.num_experts)] for layer in range(placement.num_layers)
        ]
        self.down: set[int] = set()  # workers failed over and not answering again yet (R > 1 only)
        self.failovers = 0  # layers sent again to other copies after a worker failed them (or answered late)
        self.hedges = 0  # of which: because the worker answered late
        self._readmitting = threading.Lock()

    def take_back(self, readmit: Callable[[set[int]], set[int]]) -> None:
        """Route again to the left-out workers that ``readmit(down)`` says answer again (called per layer plan and
        by the health check, so an idle frontend takes them back too; one caller at a time)."""
        with self._readmitting:
            if not self.down:
                return
            back = readmit(set(self.down))
            for w in sorted(back):
                log.info("expert worker %d answers again; routing to it", w)
            self.down -= back

    def plan(self, layer: int, routing: Routing, readmit: Callable[[set[int]], set[int]]) -> list[WorkerMessage]:
        """routing.ids/weights [T, K] -> one message per worker that has rows. ``readmit(down)``: the left-out
        workers that answer again (asked only while some are left out).

        R = 1: each expert's one worker. R > 1: a live copy per expert, balanced by routed tokens; an expert with
        rows and no live copy is an :class:`ExpertWorkerError`."""
        if self.placement.num_workers == 1:
            return dispatch.plan_one_worker(routing)
        if self.placement.replicas == 1:
            where = self._worker_of_expert[layer]
            if where.device != routing.ids.device:
                where = self._worker_of_expert[layer] = where.to(routing.ids.device)
            return dispatch.plan(routing, where)
        self.take_back(readmit)
        live = set(range(self.placement.num_workers)) - self.down
        counts = torch.bincount(routing.ids.reshape(-1), minlength=self.placement.num_experts).tolist()  # [E]
        chosen = dispatch.choose_replicas(counts, self._holders[layer], live)  # [E]
        orphans = [e for e, w in enumerate(chosen) if w < 0 and counts[e] > 0]
        if orphans:
            raise ExpertWorkerError(
                f"layer {layer} experts {orphans} have no live copy: expert workers {sorted(self.down)} are down"
            )
        where = torch.tensor([max(w, 0) for w in chosen], dtype=torch.int64, device=routing.ids.device)
        return dispatch.plan(routing, where)

    def fail_over(self, error: ExpertWorkerError) -> bool:
        """Leave the failed worker out when its experts have other copies; False when they do not (R = 1, or the
        error names no worker), and the step fails. A layer sent before the worker was left out (the other
        micro-batch in flight) fails over the same way."""
        w = error.worker
        if self.placement.replicas == 1 or w is None:
            return False
        self.failovers += 1
        self.hedges += isinstance(error, ExpertWorkerLate)
        if w in self.down:
            return True
        self.down.add(w)
        log.warning("expert worker %d failed (%s); other copies of its experts take over until it answers", w, error)
        return True
