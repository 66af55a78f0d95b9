"""Attention backend selection on a CUDA device: flash-attention-2 exactly when it can run, sdpa otherwise; and the
engine (``LLM`` at W = 0) really runs the backend chosen."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from workers.attention import select_attention_backend

pytestmark = pytest.mark.gpu


def flash_attn_imports() -> bool:
    """The independent reference: does ``import flash_attn`` really succeed here (not merely: is it installed)?"""
    try:
        import flash_attn  # noqa: F401  (optional dependency: only its importability is checked)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_auto_on_cuda_half_precision_is_flash_exactly_when_flash_attn_imports(device, dtype):
    expected = "flash_attention_2" if flash_attn_imports() else "sdpa"
    assert select_attention_backend("auto", device=device, dtype=dtype) == expected


def test_fp32_on_cuda_never_uses_flash():
    assert select_attention_backend("auto", device="cuda", dtype=torch.float32) == "sdpa"
    # Asked for explicitly, it is an error naming the backend, not a silent fallback.
    with pytest.raises(ValueError, match="flash_attention_2"):
        select_attention_backend("flash_attention_2", device="cuda", dtype=torch.float32)


def test_explicit_flash_on_cuda_bf16_follows_the_import():
    if flash_attn_imports():
        assert select_attention_backend("flash_attention_2", device="cuda", dtype=torch.bfloat16) == "flash_attention_2"
    else:
        with pytest.raises(ValueError, match="flash_attention_2"):
            select_attention_backend("flash_attention_2", device="cuda", dtype=torch.bfloat16)


def test_explicit_sdpa_and_eager_are_kept_on_cuda():
    for backend in ("sdpa", "eager"):
        assert select_attention_backend(backend, device="cuda", dtype=torch.bfloat16) == backend


def test_the_engine_runs_the_chosen_backend_on_cuda(tmp_path):
    write_tiny_model(tmp_path, TinyModelSpec(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, experts=4))
    auto = "flash_attention_2" if flash_attn_imports() else "sdpa"
    for asked, want in (("auto", auto), ("sdpa", "sdpa"), ("eager", "eager")):
        with LLM(tmp_path, dtype="bfloat16", device="cuda", attention_backend=asked, progress=False) as llm:
            assert llm.frontend_info()["attention_backend"] == want
            (out,) = llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
            assert len(out.token_ids) == 3
