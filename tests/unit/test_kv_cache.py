"""Paged KV-cache layout: where tokens are written, which blocks a group gathers, the masks, and attention over
gathered blocks against a plain softmax(q k^T) v reference."""

from __future__ import annotations

import pytest
import torch

from cluster.config.dtype import FAST_BF16_ENV
from cluster.engine.step import FREED, SeqChunk
from workers.attention import Attention, attention_compute_dtype
from workers.kv_cache import KVCache, plan_step


def test_plan_docstring_example():
    p = plan_step([SeqChunk(5, 1, (7, 2)), SeqChunk(0, 3, (4,))], block_size=4, window=None)
    assert p.positions.tolist() == [5, 0, 1, 2]
    assert list(zip(p.write_block.tolist(), p.write_offset.tolist(), strict=True)) == [(2, 1), (4, 0), (4, 1), (4, 2)]
    decode, prefill = p.groups
    assert decode.rows.tolist() == [[0]] and decode.tables.tolist() == [[7, 2]]
    assert decode.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    assert prefill.rows.tolist() == [[1, 2, 3]] and prefill.tables.tolist() == [[4]]
    assert prefill.mask[0, 0].tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
    ]


def test_a_window_gathers_only_the_blocks_it_can_see():
    # window 4, block size 2: the query at position 9 sees positions 6..9, in logical blocks 3 and 4
    p = plan_step([SeqChunk(9, 1, (FREED, FREED, FREED, 11, 12))], block_size=2, window=4)
    (g,) = p.groups
    assert g.tables.tolist() == [[11, 12]]
    assert g.mask[0, 0, 0].tolist() == [True, True, True, True]
    assert g.lengths == [4]


def test_freed_blocks_of_one_sequence_are_masked_when_another_needs_that_range():
    # two decodes with window 4 and block size 2: positions 9 (blocks 0-2 freed) and 5 (nothing freed yet)
    p = plan_step([SeqChunk(9, 1, (FREED, FREED, FREED, 11, 12)), SeqChunk(5, 1, (20, 21, 22))], block_size=2, window=4)
    (g,) = p.groups
    assert g.tables.tolist() == [[0, 0, 11, 12], [21, 22, 0, 0]]  # logical blocks 1..4: positions 2..9
    visible = g.mask[:, 0, 0].tolist()
    assert visible[0] == [False, False, False, False, True, True, True, True]  # 6..9
    assert visible[1] == [True, True, True, True, False, False, False, False]  # 2..5


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_equals_a_plain_reference(backend, window):
    """Decodes and a prefill chunk over scattered blocks give softmax(q k^T / sqrt(d)) v over exactly the keys each
    query may see, computed here from the sequences' own key/value histories."""
    torch.manual_seed(0)
    H, Hkv, Dh, bs = 4, 2, 8, 2
    kv = KVCache(num_layers=1, num_blocks=16, block_size=bs, num_kv_heads=Hkv, head_dim=Dh, dtype=torch.float32)
    layer = kv.layers[0]
    # three sequences: 5 cached + 1 decode, 2 cached + 1 decode, 3 cached + a 3-token chunk; blocks out of order
    specs = [(5, 1, (9, 3, 14)), (2, 1, (0, 6)), (3, 3, (12, 1, 7))]
    hist_k = [torch.randn(s + n, Hkv, Dh) for s, n, _ in specs]
    hist_v = [torch.randn(s + n, Hkv, Dh) for s, n, _ in specs]
    for (start, _, blocks), hk, hv in zip(specs, hist_k, hist_v, strict=True):
        for p in range(start):
            layer.k[blocks[p // bs], p % bs], layer.v[blocks[p // bs], p % bs] = hk[p], hv[p]
    chunks = [SeqChunk(s, n, b) for s, n, b in specs]
    plan = plan_step(chunks, block_size=bs, window=window)
    new_k = torch.cat([hk[s:] for (s, _, _), hk in zip(specs, hist_k, strict=True)])
    new_v = torch.cat([hv[s:] for (s, _, _), hv in zip(specs, hist_v, strict=True)])
    q = torch.randn(new_k.shape[0], H, Dh)
    out = Attention(backend=backend, num_heads=H, head_dim=Dh, window=window)(plan, q, new_k, new_v, layer)
    row = 0
    for (start, n, _), hk, hv in zip(specs, hist_k, hist_v, strict=True):
        for p in range(start, start + n):
            lo = 0 if window is None else max(0, p - window + 1)
            k = hk[lo : p + 1].repeat_interleave(H // Hkv, dim=1)  # [L, H, Dh]
            v = hv[lo : p + 1].repeat_interleave(H // Hkv, dim=1)
            probs = torch.softmax(torch.einsum("hd,lhd->hl", q[row], k) / Dh**0.5, dim=-1)
            torch.testing.assert_close(out[row], torch.einsum("hl,lhd->hd", probs, v), rtol=1e-5, atol=1e-6)
            row += 1


def _steps(dtype: torch.dtype, *, backend: str, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """Two decodes and a prefill chunk over scattered blocks (window 3) with the same bfloat16-exact numbers in
    ``dtype``: the step's attention output [T, H, Dh]."""
    g = torch.Generator().manual_seed(1)
    H, Hkv, Dh, bs = 4, 2, 8, 2
    kv = KVCache(num_layers=1, num_blocks=16, block_size=bs, num_kv_heads=Hkv, head_dim=Dh, dtype=dtype)
    layer = kv.layers[0]
    layer.k.copy_(torch.randn(layer.k.shape, generator=g).bfloat16())
    layer.v.copy_(torch.randn(layer.v.shape, generator=g).bfloat16())
    plan = plan_step([SeqChunk(5, 1, (9, 3, 14)), SeqChunk(2, 1, (0, 6)), SeqChunk(3, 3, (12, 1, 7))], block_size=bs,
                     window=3)  # fmt: skip
    q, k, v = (torch.randn(5, n, Dh, generator=g).bfloat16().to(dtype) for n in (H, Hkv, Hkv))
    attention = Attention(backend=backend, num_heads=H, head_dim=Dh, window=3, compute_dtype=compute_dtype)
    return attention(plan, q, k, v, layer)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_bfloat16_attention_in_float32_is_float32_attention_rounded_once(backend):
    """compute_dtype float32: bfloat16 queries, keys and values are attended in float32 and the output rounded to
    bfloat16 once, so it is exactly float32 attention of the same numbers, rounded."""
    got = _steps(torch.bfloat16, backend=backend, compute_dtype=torch.float32)
    want = _steps(torch.float32, backend=backend, compute_dtype=None)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    if backend == "eager":  # not a no-op: eager's bf16 scores are rounded to bf16 on any CPU (how torch's bf16 sdpa
        # rounds inside depends on the CPU's bf16 units)
        assert not torch.equal(_steps(torch.bfloat16, backend=backend, compute_dtype=None), got)


@pytest.mark.parametrize(
    ("fast_bf16", "device", "dtype", "want"),
    [("0", "cpu", torch.bfloat16, torch.float32), ("1", "cpu", torch.bfloat16, None),
     ("0", "cpu", torch.float32, None), ("0", "cuda", torch.bfloat16, None)],
)  # fmt: skip
def test_attention_runs_in_float32_for_bfloat16_on_a_cpu_without_bf16_units(
    monkeypatch, fast_bf16, device, dtype, want
):
    monkeypatch.setenv(FAST_BF16_ENV, fast_bf16)
    assert attention_compute_dtype(device=device, dtype=dtype) == want
