"""Dispatch plan (which rows go to which worker) and combine (weighted scatter-add back).

Shapes: T tokens, D hidden, E experts, K experts per token, W workers,
A_w (token, expert) assignments for worker w, N_w distinct tokens sent to worker w.

Each worker gets ONE message per layer: the distinct tokens routed to any of its experts, plus the list of
(row, expert, weight) assignments. The worker returns, per distinct token, the weighted sum of its experts'
outputs, so a token whose two experts live on the same worker travels once each way.

Example (T=3, K=2, E=4, experts 0-1 on worker 0 and 2-3 on worker 1)::

    ids = [[0, 2], [1, 0], [3, 2]]
    worker 0: tokens [0, 1], assignments (row, expert) = (0, 0), (1, 0), (1, 1)
    worker 1: tokens [0, 2], assignments (row, expert) = (0, 2), (1, 2), (1, 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.gate import Routing


@dataclass(frozen=True)
class WorkerMessage:
    """What one worker receives for one layer.

    tokens  [N_w]  indices into the step's T tokens (sorted, distinct)
    rows    [A_w]  index into ``tokens`` for each assignment
    experts [A_w]  expert id of each assignment, sorted ascending
    weights [A_w]  float32 routing weight of each assignment
    """

    worker: int
    tokens: torch.Tensor
    rows: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor

    def has_every_token(self, num_tokens: int) -> bool:
        """Whether ``tokens`` is all of 0..T-1 (they are sorted and distinct, so then they are in step order)."""
        return self.tokens.numel() == num_tokens


def plan(routing: Routing, worker_of_expert: torch.Tensor) -> list[WorkerMessage]:
    """Group the step's assignments by worker; workers with nothing routed get no message.

    routing.ids/weights [T, K]; worker_of_expert [E] int64.
    """
    T, K = routing.ids.shape
    E = worker_of_expert.shape[0]
    flat_e = routing.ids.reshape(-1)  # [T*K]
    flat_t = torch.arange(T, device=flat_e.device).repeat_interleave(K)  # [T*K]
    flat_w = routing.weights.reshape(-1)  # [T*K]
    flat_worker = worker_of_expert.to(flat_e.device)[flat_e]  # [T*K]
    order = torch.argsort(flat_worker * E + flat_e, stable=True)
    sorted_worker = flat_worker[order]
    workers, counts = torch.unique_consecutive(sorted_worker, return_counts=True)
    messages = []
    start = 0
    for w, c in zip(workers.tolist(), counts.tolist(), strict=True):
        seg = order[start : start + c]
        start += c
        tokens, rows = torch.unique(flat_t[seg], sorted=True, return_inverse=True)
        messages.append(WorkerMessage(worker=w, tokens=tokens, rows=rows, experts=flat_e[seg], weights=flat_w[seg]))
    return messages


def plan_one_worker(routing: Routing, worker: int = 0) -> list[WorkerMessage]:
    """:func:`plan` when every expert lives on one worker: every token goes to it, in step order, so the
    distinct-token bookkeeping is skipped (for T >= 1, the same message as :func:`plan` gives; steps are never empty).

    Example (T=2, K=2): ids [[3, 0], [0, 1]] -> tokens [0, 1]; experts [0, 0, 1, 3]; rows [0, 1, 1, 0].
    """
    T, K = routing.ids.shape
    flat_e = routing.ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_e, stable=True)  # [T*K]
    rows = torch.div(order, K, rounding_mode="floor")  # token of each sorted assignment
    tokens = torch.arange(T, device=flat_e.device)
    return [WorkerMessage(worker, tokens, rows, flat_e[order], routing.weights.reshape(-1)[order])]


def combine(messages: list[WorkerMessage], partials: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Sum every worker's partial outputs [N_w, D] back into [T, D] (same dtype and shape as ``like``). One
    message holding every token (in order: tokens are sorted and distinct) is its own sum, copied (a transport's
    partial can be a read-only view of a received buffer)."""
    if len(messages) == 1 and messages[0].has_every_token(like.shape[0]):
        return partials[0].to(device=like.device, dtype=like.dtype, copy=True)
    out = torch.zeros_like(like)
    for m, p in zip(messages, partials, strict=True):
        # tokens of one message are distinct: accumulate-put (index_add_ stalls under CPU contention)
        out.index_put_((m.tokens.to(out.device),), p.to(device=out.device, dtype=out.dtype), accumulate=True)
    return out


def choose_replicas(counts: list[int], holders: list[tuple[int, ...]], live: set[int]) -> list[int]:
    """One live worker per expert for this layer, balancing routed tokens across the copies.

    counts [E] tokens routed to each expert; holders [E] the workers holding each expert (primary first); live the
    workers taken to be up. Heaviest expert first, each goes to its live holder with the fewest tokens so far (ties:
    the holder listed first). An expert with no live holder gets -1.

    Example (E=4, every expert on workers 0 and 1, all live): counts [5, 3, 2, 1] -> [0, 1, 1, 0]
    (5 -> w0; 3 -> w1; 2 -> w1, 5 vs 3; 1 -> w0 or w1 at 5 each: w0 is listed first).
    """
    load: dict[int, int] = {}
    out = [-1] * len(counts)
    for e in sorted(range(len(counts)), key=lambda e: -counts[e]):
        best = -1
        for w in holders[e]:
            if w in live and (best < 0 or load.get(w, 0) < load.get(best, 0)):
                best = w
        if best >= 0:
            load[best] = load.get(best, 0) + counts[e]
        out[e] = best
    return out
