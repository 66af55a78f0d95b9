"""Slot-based KV cache with an optional sliding-window rolling buffer, and the per-step attention layout.

The scheduler hands each sequence a slot (``cluster.engine``); this module only stores tensors by slot. A slot
stores ``capacity`` positions per layer: the full context when the model has no sliding window, or exactly
``sliding_window`` positions when it has one. Position ``p`` lives at index ``p % capacity``, so with a window the
buffer rolls and memory stays fixed however long the sequence gets.

Which absolute position sits at buffer index ``r`` once ``L`` tokens are cached::

    p(r) = (L - 1) - ((L - 1 - r) mod capacity)      valid when r < L

Example: capacity 4, L = 6 -> indices 0..3 hold positions 4, 5, 2, 3.

Shapes: T tokens in the step, Hkv KV heads, Dh head dim, B sequences in a group, n new tokens per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.step import SeqChunk


@dataclass
class AttentionGroup:
    """Queries of one or more sequences attended together, with keys = cached keys ++ this step's keys.

    rows      [B, n]   indices into the step's flat token axis (queries of each sequence, n per sequence)
    slots     [B]      KV-cache slot of each sequence
    cached    int      how many cache entries to read per sequence (max over the group)
    mask      [B, 1, n, cached + n] bool, True where a query may see a key (causal, sliding window, validity)
    key_order [B, cached + n] or None: key indices sorted by position (flash-attention needs keys in order)
    """

    rows: torch.Tensor
    slots: torch.Tensor
    cached: int
    mask: torch.Tensor
    key_order: torch.Tensor | None = None


@dataclass
class StepPlan:
    """Everything about a step's layout that is the same for every layer, computed once.

    positions    [T]  absolute position of each new token
    token_slots  [T]  slot of each new token
    token_index  [T]  cache index of each new token (position % capacity)
    groups            attention groups: all single-token (decode) sequences together, each longer chunk alone
    write_rows        None (write every token) or the rows to write when a chunk is longer than the rolling
                      buffer: only its last ``capacity`` tokens, so no two writes hit the same index
    views             decode tokens attended AFTER the step's write, straight from their slot:
                      (row, slot, entries). Used for large decode batches, where gathering every slot's cache
                      into one padded batch costs more than a loop of small attention calls. One new token at
                      position L sees exactly the first min(L + 1, capacity) entries (with a window, the
                      buffer holds exactly the window), so no mask is needed.
    """

    positions: torch.Tensor
    token_slots: torch.Tensor
    token_index: torch.Tensor
    groups: list[AttentionGroup]
    write_rows: torch.Tensor | None = None
    views: list[tuple[int, int, int]] = field(default_factory=list)


class LayerKV:
    """One layer's K and V buffers [slots, capacity, Hkv, Dh], and the only ways the model touches them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k
        self.v = v

    def write(self, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's keys/values k, v [T, Hkv, Dh] (rows ``plan.write_rows`` only, when set)."""
        if plan.write_rows is None:
            self.k[plan.token_slots, plan.token_index] = k
            self.v[plan.token_slots, plan.token_index] = v
        else:
            rows = plan.write_rows
            self.k[plan.token_slots[rows], plan.token_index[rows]] = k[rows]
            self.v[plan.token_slots[rows], plan.token_index[rows]] = v[rows]

    def gather(self, slots: torch.Tensor, entries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``entries`` cache entries of each slot: k, v [B, entries, Hkv, Dh] (copies)."""
        return self.k[slots, :entries], self.v[slots, :entries]

    def slot(self, slot: int, entries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one slot's first ``entries`` entries, heads first: k, v [Hkv, entries, Dh] (no copy)."""
        return self.k[slot, :entries].transpose(0, 1), self.v[slot, :entries].transpose(0, 1)


class KVCache:
    """K and V buffers of every layer, each [slots, capacity, Hkv, Dh]."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        shape = (num_slots, capacity, num_kv_heads, head_dim)
        self.layers = [
            LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v))


def plan_step(
    chunks: tuple[SeqChunk, ...] | list[SeqChunk],
    *,
    capacity: int,
    window: int | None,
    device: torch.device | str = "cpu",
    need_key_order: bool = False,
    view_threshold: int | None = None,
) -> StepPlan:
    """Lay out a step: chunks in order form the flat token axis (T = sum of n).

    ``view_threshold``: decode batches whose sequences x cached entries reach it attend in place (``views``);
    None never does. Example: chunks [SeqChunk(slot=0, start=5, n=1), SeqChunk(slot=1, start=0, n=3)] give
    positions [5, 0, 1, 2], one decode group (row 0, reading 5 cached keys) and one prefill group (rows 1..3,
    none cached).
    """
    positions, slots, keep = [], [], []
    for c in chunks:
        positions.extend(range(c.start, c.start + c.n))
        slots.extend([c.slot] * c.n)
        keep.extend(i >= c.n - capacity for i in range(c.n))
    pos_t = torch.tensor(positions, dtype=torch.int64)
    slots_t = torch.tensor(slots, dtype=torch.int64)
    groups: list[AttentionGroup] = []

    offsets, row = [], 0
    for c in chunks:
        offsets.append(row)
        row += c.n
    decode = [i for i, c in enumerate(chunks) if c.n == 1]
    views: list[tuple[int, int, int]] = []
    if decode and view_threshold is not None:
        cached = min(max(chunks[i].start for i in decode), capacity)
        if len(decode) * cached >= view_threshold:
            views = [(offsets[i], chunks[i].slot, min(chunks[i].start + 1, capacity)) for i in decode]
            decode = []
    if decode:
        groups.append(
            _group(
                [chunks[i] for i in decode],
                [offsets[i] for i in decode],
                capacity=capacity,
                window=window,
                need_key_order=need_key_order,
            )
        )
    for i, c in enumerate(chunks):
        if c.n > 1:
            groups.append(_group([c], [offsets[i]], capacity=capacity, window=window, need_key_order=need_key_order))
    for g in groups:
        g.rows, g.slots, g.mask = g.rows.to(device), g.slots.to(device), g.mask.to(device)
        if g.key_order is not None:
            g.key_order = g.key_order.to(device)
    return StepPlan(
        positions=pos_t.to(device),
        token_slots=slots_t.to(device),
        token_index=(pos_t % capacity).to(device),
        groups=groups,
        write_rows=None if all(keep) else torch.tensor(keep).nonzero().reshape(-1).to(device),
        views=views,
    )


def _group(
    chunks: list[SeqChunk], offsets: list[int], *, capacity: int, window: int | None, need_key_order: bool
) -> AttentionGroup:
    n = chunks[0].n  # equal within a group: all 1 (decode) or a single chunk
    cached = min(max(c.start for c in chunks), capacity)
    B = len(chunks)
    # Absolute position of every key: cached entries [B, cached] then the new ones [B, n].
    r = torch.arange(cached)
    key_pos = torch.empty(B, cached + n, dtype=torch.int64)
    key_ok = torch.ones(B, cached + n, dtype=torch.bool)
    q_pos = torch.empty(B, n, dtype=torch.int64)
    for b, c in enumerate(chunks):
        L = c.start
        key_pos[b, :cached] = (L - 1) - torch.remainder(L - 1 - r, capacity)
        key_ok[b, :cached] = r < L
        key_pos[b, cached:] = torch.arange(c.start, c.start + n)
        q_pos[b] = torch.arange(c.start, c.start + n)
    # mask [B, 1, n, cached + n]
    qp = q_pos[:, :, None]
    kp = key_pos[:, None, :]
    mask = key_ok[:, None, :] & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    key_order = None
    if need_key_order:
        key_order = torch.argsort(torch.where(key_ok, key_pos, torch.iinfo(torch.int64).max), dim=1)
    rows = torch.stack([torch.arange(o, o + n) for o in offsets])
    return AttentionGroup(
        rows=rows,
        slots=torch.tensor([c.slot for c in chunks], dtype=torch.int64),
        cached=cached,
        mask=mask[:, None],
        key_order=key_order,
    )
