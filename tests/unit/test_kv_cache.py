"""KV-cache layout: the rolling buffer, write rows, attention masks, and the in-place decode path."""

from __future__ import annotations

import pytest
import torch

from cluster.step import SeqChunk
from workers.attention import Attention
from workers.kv_cache import KVCache, plan_step


def test_rolling_buffer_layout_and_masks():
    # capacity 4 (= sliding window 4), 6 tokens cached, one new token at position 6
    p = plan_step([SeqChunk(slot=1, start=6, n=1)], capacity=4, window=4)
    assert p.token_index.tolist() == [6 % 4]
    (g,) = p.groups
    assert g.cached == 4
    # cache indices 0..3 hold positions 4, 5, 2, 3; the query at 6 sees 3, 4, 5 and itself (window 4)
    assert g.mask[0, 0, 0].tolist() == [True, True, False, True, True]


def test_chunk_longer_than_the_buffer_writes_only_its_tail():
    p = plan_step([SeqChunk(slot=0, start=0, n=7)], capacity=5, window=5)
    assert p.write_rows is not None
    assert p.write_rows.tolist() == [2, 3, 4, 5, 6]
    assert p.token_index[p.write_rows].tolist() == [2, 3, 4, 0, 1]


def test_plan_docstring_example():
    p = plan_step([SeqChunk(slot=0, start=5, n=1), SeqChunk(slot=1, start=0, n=3)], capacity=16, window=None)
    assert p.positions.tolist() == [5, 0, 1, 2]
    decode, prefill = p.groups
    assert decode.rows.tolist() == [[0]] and decode.cached == 5
    assert prefill.rows.tolist() == [[1, 2, 3]] and prefill.cached == 0


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 3])
def test_in_place_decode_equals_gathered_decode(backend, window):
    """The two decode paths of one backend (gathered groups vs in-place slot views) give the same output and
    leave the same cache, against a plain softmax(q k^T) v computed here from the keys each query may see."""
    torch.manual_seed(0)
    H, Hkv, Dh, cap = 4, 2, 8, 6 if window is None else 3
    lengths = [5, 2, 4]  # cached tokens per slot before the step (over the capacity with the window)
    caches, outs = [], []
    history = torch.randn(len(lengths), max(lengths) + 1, Hkv, Dh), torch.randn(len(lengths), max(lengths) + 1, Hkv, Dh)
    q = torch.randn(len(lengths), H, Dh)
    for threshold in (None, 1):
        kv = KVCache(num_layers=1, num_slots=3, capacity=cap, num_kv_heads=Hkv, head_dim=Dh, dtype=torch.float32)
        layer = kv.layers[0]
        for s, n in enumerate(lengths):  # fill each slot with its history, position p at index p % capacity
            for pos in range(n):
                layer.k[s, pos % cap], layer.v[s, pos % cap] = history[0][s, pos], history[1][s, pos]
        chunks = [SeqChunk(slot=s, start=n, n=1) for s, n in enumerate(lengths)]
        plan = plan_step(chunks, capacity=cap, window=window, view_threshold=threshold)
        assert bool(plan.views) == (threshold is not None)
        new_k = torch.stack([history[0][s, n] for s, n in enumerate(lengths)])
        new_v = torch.stack([history[1][s, n] for s, n in enumerate(lengths)])
        attn = Attention(backend=backend, num_heads=H, head_dim=Dh, window=window)
        outs.append(attn(plan, q, new_k, new_v, layer))
        caches.append((layer.k.clone(), layer.v.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[0], caches[1])
    for s, n in enumerate(lengths):  # reference: the query at position n sees positions max(0, n-w+1) .. n
        lo = 0 if window is None else max(0, n - window + 1)
        k = history[0][s, lo : n + 1].repeat_interleave(H // Hkv, dim=1)  # [L, H, Dh]
        v = history[1][s, lo : n + 1].repeat_interleave(H // Hkv, dim=1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[s], k) / Dh**0.5, dim=-1)
        torch.testing.assert_close(outs[1][s], torch.einsum("hl,lhd->hd", probs, v), rtol=1e-5, atol=1e-6)
