"""Which attention backend runs: chosen once, from the device, the dtype and whether flash-attn imports."""

from __future__ import annotations

import pytest
import torch

import workers.attention as attention
from workers.attention import select_attention_backend


def test_attention_backend_selection(monkeypatch):
    assert select_attention_backend("auto", device="cpu", dtype=torch.float32) == "sdpa"
    assert select_attention_backend("eager", device="cpu", dtype=torch.float32) == "eager"
    with pytest.raises(ValueError, match="not installed|CUDA"):
        select_attention_backend("flash_attention_2", device="cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown"):
        select_attention_backend("xformers", device="cpu", dtype=torch.float32)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert select_attention_backend("auto", device="cuda", dtype=torch.bfloat16) == "flash_attention_2"
    assert select_attention_backend("auto", device="cuda", dtype=torch.float16) == "flash_attention_2"
    assert select_attention_backend("auto", device="cuda", dtype=torch.float32) == "sdpa"
    assert select_attention_backend("auto", device="cpu", dtype=torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="float16/bfloat16"):
        select_attention_backend("flash_attention_2", device="cuda", dtype=torch.float32)
