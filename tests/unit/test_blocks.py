"""The KV block pool on its own: the prefix-cache hash chain and which cached block an allocation evicts.

The scheduler's tests run against a fake executor that stores token ids only, so a hash that forgets the prefix or
an eviction order that keeps the wrong block would not change their outputs; these tests look at the pool itself.
"""

from __future__ import annotations

import pytest

from cluster.engine.blocks import BlockPool, block_hashes

BS = 4


def test_equal_blocks_after_different_prefixes_have_different_hashes():
    """A block is named by its tokens and everything before it: the same 4 tokens as block 0 and as block 1 (after
    itself, or after another block) get three different hashes, so a cached block is never reused at the wrong
    position or after the wrong prefix."""
    block = [1, 415, 2936, 9060]
    other = [5, 6, 7, 8]
    (alone,) = block_hashes(block, BS)
    first, repeated = block_hashes(block * 2, BS)
    _, after_other = block_hashes(other + block, BS)
    assert first == alone  # the same prefix (none) and the same tokens: the same name
    assert len({first, repeated, after_other}) == 3
    assert all(len(h) == 16 for h in (first, repeated, after_other))


def test_the_hash_of_a_block_depends_on_every_earlier_token():
    """Changing any one token changes the hash of its own block and of every block after it, and leaves the
    blocks before it alone; a partly filled last block gets no hash."""
    tokens = list(range(100, 116))  # 4 full blocks
    base = block_hashes(tokens + [7, 8], BS)
    assert len(base) == 4
    for pos in range(len(tokens)):
        changed = list(tokens)
        changed[pos] += 1
        got = block_hashes(changed + [7, 8], BS)
        b = pos // BS
        assert got[:b] == base[:b], pos
        assert all(g != h for g, h in zip(got[b:], base[b:], strict=True)), pos


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4])
def test_start_and_parent_continue_a_chain_exactly(start):
    """Hashing from block ``start`` with ``parent`` = the hash of block start - 1 (what the scheduler does as a
    sequence grows) gives exactly the tail of the chain hashed over the whole sequence."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]  # 4 full blocks and one token
    whole = block_hashes(tokens, BS)
    parent = whole[start - 1] if start else b""
    assert block_hashes(tokens, BS, start=start, parent=parent) == whole[start:]
    if 0 < start < len(whole):  # the parent is part of the name: continuing another chain gives other hashes
        other = block_hashes(tokens, BS, start=start, parent=b"")
        assert all(o != w for o, w in zip(other, whole[start:], strict=True))


def cached_pool(n: int) -> tuple[BlockPool, list[int], list[bytes]]:
    """A pool of n blocks, each allocated, named by a distinct hash and released in block order."""
    pool = BlockPool(n, BS)
    hashes = block_hashes(list(range(1000, 1000 + n * BS)), BS)
    blocks = [pool.allocate() for _ in range(n)]
    for b, h in zip(blocks, hashes, strict=True):
        pool.register(b, h)
    for b in blocks:
        pool.release(b)
    return pool, blocks, hashes


def findable(pool: BlockPool, hashes: list[bytes]) -> list[bool]:
    """Which of ``hashes`` the pool still finds (each looked up alone and given back, which makes it the most
    recently used: call it only where the eviction order no longer matters)."""
    out = []
    for h in hashes:
        found = pool.lookup([h])
        pool.undo_lookup(found, 1)
        out.append(bool(found))
    return out


def test_allocation_evicts_the_least_recently_used_cached_block_first():
    """Cached blocks released in the order 0, 1, 2, 3, then block 1 found again and given back (now the most
    recently used): the next two allocations evict blocks 0 and 2 (each hands out the block it evicts), and 1 and
    3 can still be found."""
    pool, blocks, hashes = cached_pool(4)
    (b1,) = pool.lookup([hashes[1]])
    assert b1 == blocks[1] and pool.ref[b1] == 1 and pool.num_free == 3
    pool.release(b1)
    assert pool.num_free == 4 and pool.num_used == 0
    taken = [pool.allocate(), pool.allocate()]
    assert findable(pool, hashes) == [False, True, False, True]
    assert taken == [blocks[0], blocks[2]]
    assert pool.num_free == 2 and pool.hits == 1  # findable gave back what it counted
    taken += [pool.allocate(), pool.allocate()]
    assert sorted(taken) == sorted(blocks) and findable(pool, hashes) == [False] * 4
    with pytest.raises(RuntimeError, match="no free KV-cache block"):
        pool.allocate()


def test_never_used_blocks_go_before_cached_ones():
    """A block that never held a prefix is handed out before any cached block is evicted."""
    pool = BlockPool(3, BS)
    (h,) = block_hashes([1, 2, 3, 4], BS)
    b = pool.allocate()
    pool.register(b, h)
    pool.release(b)
    others = [pool.allocate(), pool.allocate()]
    assert b not in others and pool.lookup([h]) == [b]
