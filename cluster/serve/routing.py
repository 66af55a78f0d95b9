"""Which frontend replica runs a request: the one that has its prompt's prefix cached, when it has room
(:class:`PrefixAffinityRouter`, the Frontend deployment's Ray Serve request router).

Every frontend has its own prefix cache (KV blocks), so requests that share a prefix (a system prompt, a few-shot
header, a conversation so far) should meet on one frontend. The router keys a request by its first
:data:`PREFIX_TOKENS` prompt tokens and ranks the replicas by rendezvous hashing on that key: the same key gives the
same order on every ingress replica, with no shared state, and a replica joining or leaving moves only its share of
the keys. The first replica in that order gets the request when it has room (``free_seqs`` > 0 in the routing stats
it reports: ``FrontendServer.record_routing_stats``); otherwise the two with the most room are ranked first and Ray
Serve takes the less loaded of them (power of two choices), as for a request without a prompt key.

Example: prompts A and B share their first 32 tokens -> both go to the same replica while it runs fewer than
``max_num_seqs`` sequences; a prompt C with another start most likely goes elsewhere.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

PREFIX_TOKENS = 32  # a request's key: its first tokens (two KV blocks of the default 16)


def prefix_key(pending: PendingRequest | None) -> bytes | None:
    """The key of a ``FrontendServer.generate(prompt_token_ids, ...)`` call: its first tokens; None for other calls."""
    if pending is None or not pending.args or not isinstance(pending.args[0], list | tuple):
        return None
    head = pending.args[0][:PREFIX_TOKENS]
    if not head or not all(isinstance(t, int) for t in head):
        return None
    return b",".join(str(t).encode() for t in head)


def rendezvous(key: bytes, replica: RunningReplica) -> int:
    """The replica's weight for ``key``: the highest weight wins the key."""
    return int.from_bytes(hashlib.blake2b(key + repr(replica.replica_id).encode(), digest_size=8).digest(), "big")


def room(replica: RunningReplica) -> int:
    """Sequences the replica can start now, from its last routing stats (unknown: counted as having room)."""
    free = (replica.routing_stats or {}).get("free_seqs")
    return 1 if free is None else int(free)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas, most preferred first (Ray Serve takes the least loaded that accepts, rank by rank)."""
        if not candidate_replicas:
            return []
        key = prefix_key(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: rendezvous(key, r), reverse=True)
        if room(ranked[0]) > 0:
            return [[ranked[0]], ranked[1:]] if len(ranked) > 1 else [ranked]
        roomiest = sorted(ranked[1:], key=room, reverse=True)
        return [roomiest[:2], roomiest[2:] + ranked[:1]]
