"""Paged KV cache (tensors only) and the per-step attention layout over block tables.

The scheduler (``cluster.engine``) hands out blocks; this module stores keys and values by block: one pool per
layer, K and V each [num_blocks, block_size, Hkv, Dh]. Position p of a sequence with block table ``blocks`` lives
at ``(blocks[p // block_size], p % block_size)``.

A step is laid out once for every layer (:func:`plan_step`): where each new token's keys and values are written,
and the attention groups: all decoding sequences (one query each) in one group, each longer chunk (prefill) in a
group of its own. A group gathers, per sequence, the blocks from the first one any of its queries may see up to
its last, so with a sliding window only the window is read. A step of two micro-batches is cut between chunks
(:func:`split_point`) into two layouts (:func:`split_plan`).

Shapes: T tokens in the step, Hkv KV heads, Dh head dim, B sequences in a group, n queries per sequence,
NB blocks gathered per sequence, bs block size, L = NB * bs keys per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.step import FREED, SeqChunk


@dataclass
class AttentionGroup:
    """Queries of one or more sequences attended together over their gathered blocks.

    rows      [B, n]       indices into the step's flat token axis (queries of each sequence, n per sequence)
    tables    [B, NB]      physical blocks to gather per sequence (FREED entries read block 0 and are masked)
    mask      [B, 1, n, L] bool, True where a query may see a key (causal, sliding window, block still held)
    lengths   [B]          keys from the first gathered position to the last query's position, inclusive
    """

    rows: torch.Tensor
    tables: torch.Tensor
    mask: torch.Tensor
    lengths: list[int]


@dataclass
class StepPlan:
    """Everything about a step's layout that is the same for every layer, computed once.

    positions     [T]  absolute position of each new token
    write_block   [T]  physical block of each new token
    write_offset  [T]  offset in that block
    groups             attention groups (see the module docstring)
    """

    positions: torch.Tensor
    write_block: torch.Tensor
    write_offset: torch.Tensor
    groups: list[AttentionGroup]


class LayerKV:
    """One layer's K and V pools [num_blocks, block_size, Hkv, Dh], and the only ways the model touches them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k
        self.v = v

    def write(self, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's keys/values k, v [T, Hkv, Dh] at their (block, offset)."""
        self.k[plan.write_block, plan.write_offset] = k
        self.v[plan.write_block, plan.write_offset] = v

    def gather(self, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of each table row laid end to end: k, v [B, NB * bs, Hkv, Dh] (copies)."""
        B, NB = tables.shape
        flat = tables.reshape(-1)  # index_select copies whole blocks: ~5x faster on CPU than k[tables]
        k = self.k.index_select(0, flat)  # [B * NB, bs, Hkv, Dh]
        v = self.v.index_select(0, flat)
        return k.view(B, NB * k.shape[1], *k.shape[2:]), v.view(B, NB * v.shape[1], *v.shape[2:])


class KVCache:
    """The pools of every layer."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers = [
            LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v))


def plan_step(
    chunks: tuple[SeqChunk, ...] | list[SeqChunk],
    *,
    block_size: int,
    window: int | None,
    device: torch.device | str = "cpu",
) -> StepPlan:
    """Lay out a step: chunks in order form the flat token axis (T = sum of n).

    Example (block size 4, no window): chunks [SeqChunk(5, 1, (7, 2)), SeqChunk(0, 3, (4,))] give positions
    [5, 0, 1, 2], writes at (2, 1), (4, 0), (4, 1), (4, 2), one decode group (row 0, gathering blocks [7, 2],
    6 keys visible) and one prefill group (rows 1..3, gathering block [4], a causal mask over 3 keys).
    """
    bs = block_size
    positions: list[int] = []
    wblock: list[int] = []
    offsets: list[int] = []
    row = 0
    for c in chunks:
        offsets.append(row)
        row += c.n
        for p in range(c.start, c.start + c.n):
            positions.append(p)
            wblock.append(c.blocks[p // bs])
    pos_t = torch.tensor(positions, dtype=torch.int64)
    decode = [i for i, c in enumerate(chunks) if c.n == 1]
    groups = []
    if decode:
        groups.append(_group([chunks[i] for i in decode], [offsets[i] for i in decode], bs, window, device))
    for i, c in enumerate(chunks):
        if c.n > 1:
            groups.append(_group([c], [offsets[i]], bs, window, device))
    return StepPlan(
        positions=pos_t.to(device),
        write_block=torch.tensor(wblock, dtype=torch.int64).to(device),
        write_offset=(pos_t % bs).to(device),
        groups=groups,
    )


def _group(
    chunks: list[SeqChunk], offsets: list[int], bs: int, window: int | None, device: torch.device | str
) -> AttentionGroup:
    n = chunks[0].n  # equal within a group: all 1 (decode) or a single chunk
    # First block any query of the group may see, and one past the last block holding a query.
    first = min(max(0, c.start - window + 1) // bs if window else 0 for c in chunks)
    last = max(-(-(c.start + c.n) // bs) for c in chunks)
    NB = last - first
    # Built as Python lists, one tensor each: per-sequence tensor ops cost ~5 us apiece at decode batch 32.
    table_rows, held_rows = [], []
    for c in chunks:
        row = c.blocks[first : min(last, len(c.blocks))]
        pad = [0] * (NB - len(row))
        table_rows.append([0 if b == FREED else b for b in row] + pad)
        held_rows.append([b != FREED for b in row] + pad)
    tables = torch.tensor(table_rows, dtype=torch.int64)  # [B, NB]
    held = torch.tensor(held_rows, dtype=torch.bool)  # [B, NB]
    key_pos = first * bs + torch.arange(NB * bs)  # [L]
    q_pos = torch.tensor([list(range(c.start, c.start + n)) for c in chunks], dtype=torch.int64)  # [B, n]
    kp, qp = key_pos[None, None, :], q_pos[:, :, None]
    mask = held.repeat_interleave(bs, dim=1)[:, None, :] & (kp <= qp)  # [B, n, L]
    if window is not None:
        mask &= kp > qp - window
    rows = torch.tensor([list(range(o, o + n)) for o in offsets], dtype=torch.int64)  # [B, n]
    return AttentionGroup(
        rows=rows.to(device),
        tables=tables.to(device),
        mask=mask[:, None].to(device),
        lengths=[c.start + c.n - first * bs for c in chunks],
    )


def split_point(plan: StepPlan, min_batch: int) -> int | None:
    """Where to cut a step of T >= ``min_batch`` tokens into two micro-batches: the chunk boundary nearest T / 2 (a
    chunk is never cut). None when ``min_batch`` is 0, the step is smaller, or no boundary leaves each half at
    least T / 4 tokens (one long prefill chunk, say)."""
    T = int(plan.positions.shape[0])
    if min_batch <= 0 or min_batch > T:
        return None
    starts = sorted(r for g in plan.groups for r in g.rows[:, 0].tolist())  # first row of every chunk
    cuts = [c for c in starts if 4 * min(c, T - c) >= T]
    return min(cuts, key=lambda c: (abs(2 * c - T), c)) if cuts else None


def split_plan(plan: StepPlan, k: int) -> tuple[StepPlan, StepPlan]:
    """The layout of tokens [:k] and of tokens [k:] (rows renumbered from 0). ``k`` must be a chunk boundary, so
    every sequence of an attention group falls wholly in one half; a group keeps its gathered blocks and masks."""
    halves: tuple[list[AttentionGroup], list[AttentionGroup]] = ([], [])
    for g in plan.groups:
        first = g.rows[:, 0] < k  # [B]
        for half, sel, base in ((0, first, 0), (1, ~first, k)):
            idx = sel.nonzero().flatten().tolist()
            if idx:
                halves[half].append(
                    AttentionGroup(
                        rows=g.rows[sel] - base,
                        tables=g.tables[sel],
                        mask=g.mask[sel],
                        lengths=[g.lengths[b] for b in idx],
                    )
                )
    a, b = slice(0, k), slice(k, None)
    return (
        StepPlan(plan.positions[a], plan.write_block[a], plan.write_offset[a], halves[0]),
        StepPlan(plan.positions[b], plan.write_block[b], plan.write_offset[b], halves[1]),
    )
