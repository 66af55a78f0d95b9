"""KV-cache blocks: the scheduler's accounting of the paged cache, with automatic prefix caching.

The cache is a pool of ``num_blocks`` blocks of ``block_size`` positions (the tensors live with the executor;
this module only hands out block ids). A sequence owns a block table: logical block i (positions
``i * block_size .. (i + 1) * block_size - 1``) -> physical block id, ``-1`` once a sliding window has left it.

Prefix caching: a FULL block is named by the hash of every token up to and including it (a hash chain), so two
sequences that share a prefix share its blocks. Blocks are reference-counted; a block whose count drops to 0 stays
cached (and can be found again) until the pool needs it, oldest first (LRU).

Example (block_size 4, caching on): sequence A with tokens [1 2 3 4 5 6 7 8 9] fills blocks b0 = [1 2 3 4] and
b1 = [5 6 7 8] and holds b2 for [9]. A later request [1 2 3 4 5 6 7 8 10 11] finds b0 and b1 by their hashes,
takes a reference to both and computes only [10 11] into a new block.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence

from cluster.engine.step import FREED


def block_hashes(tokens: Sequence[int], block_size: int, *, start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Hash chain of the full blocks of ``tokens`` from block ``start`` (``parent``: the hash of block start - 1).

    128-bit BLAKE2b digests: two different prefixes never share blocks in practice.
    """
    out: list[bytes] = []
    h = parent
    for b in range(start, len(tokens) // block_size):
        block = array("q", tokens[b * block_size : (b + 1) * block_size]).tobytes()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        out.append(h)
    return out


class BlockPool:
    """Free, used and cached blocks. Not thread-safe: the engine's thread owns it."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._free: collections.deque[int] = collections.deque(range(num_blocks))  # never cached, or evicted
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, ref 0; LRU first
        self.hits = 0  # blocks found in the prefix cache
        self.queries = 0  # full prompt blocks looked up

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never used, or cached with no reference)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # ------------------------------------------------------------------ allocation
    def allocate(self) -> int:
        """A block with reference count 1: a never-used one first, else the least recently used cached one."""
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            h = self._hash_of[b]
            if h is not None and self._by_hash.get(h) == b:
                del self._by_hash[h]
            self._hash_of[b] = None
        else:
            raise RuntimeError("no free KV-cache block")
        self.ref[b] = 1
        return b

    def release(self, block: int) -> None:
        """Drop one reference; at zero the block is free again (kept findable while it holds a cached prefix)."""
        if block == FREED:
            return
        if self.ref[block] <= 0:
            raise RuntimeError(f"KV-cache block {block} released more often than taken")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if self._hash_of[block] is not None:
                self._evictable[block] = None  # most recently used at the end
            else:
                self._free.append(block)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Take a reference to the cached blocks of the longest cached prefix of ``hashes``."""
        if not self.prefix_caching:
            return []
        found = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                self._evictable.pop(b, None)
            self.ref[b] += 1
            found.append(b)
        self.queries += len(hashes)
        self.hits += len(found)
        return found

    def undo_lookup(self, found: Sequence[int], queries: int) -> None:
        """Give back what :meth:`lookup` took (and uncount it) when the request does not start after all."""
        for b in reversed(found):
            self.release(b)
        self.queries -= queries
        self.hits -= len(found)

    def register(self, block: int, h: bytes) -> None:
        """Name a block that has just become full (its tokens and everything before it hash to ``h``)."""
        if self.prefix_caching and self._hash_of[block] is None and h not in self._by_hash:
            self._by_hash[h] = block
            self._hash_of[block] = h
