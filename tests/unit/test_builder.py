"""Building from a config: model folders and Hugging Face ids from the local cache, dtype auto, KV-cache sizing."""

from __future__ import annotations

import json

import pytest

import cluster.builder as builder
from cluster.builder import ClusterConfig, kv_blocks
from cluster.config import ModelConfig
from cluster.errors import SetupError
from cluster.tiny_model import TinyModelSpec, write_tiny_model

SPEC = TinyModelSpec(hidden=32, intermediate=64, layers=1, experts=4)


def set_saved_dtype(folder, dtype):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("saved", "device", "fast_bf16", "want"),
    [
        ("float32", "cpu", True, "float32"),
        ("bfloat16", "cpu", True, "bfloat16"),
        ("bfloat16", "cpu", False, "float32"),
        ("float16", "cpu", True, "float32"),
        ("bfloat16", "cuda", False, "bfloat16"),
        ("float16", "cuda", False, "float16"),
    ],
)
def test_dtype_auto_follows_the_checkpoint(tmp_path, monkeypatch, saved, device, fast_bf16, want):
    folder = write_tiny_model(tmp_path, SPEC)
    set_saved_dtype(folder, saved)
    monkeypatch.setattr(builder, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert builder.resolve_dtype("auto", str(folder), device) == want
    assert builder.resolve_dtype("float16", str(folder), device) == "float16"  # an explicit dtype is kept


def test_config_create_resolves_and_names_bad_fields(tmp_path):
    folder = write_tiny_model(tmp_path, SPEC)
    config = ClusterConfig.create(model=str(folder))
    assert config.dtype == "float32" and config.model == str(folder)
    with pytest.raises(SetupError, match="max_num_seqs"):
        ClusterConfig.create(model=str(folder), max_num_seqs=True)
    with pytest.raises(SetupError, match="not a checkpoint folder"):
        ClusterConfig.create(model=str(tmp_path / "missing" / "deeper" / "x"))


def test_a_hugging_face_id_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    folder = write_tiny_model(tmp_path / "snap", SPEC)
    calls = []

    def snapshot_download(repo_id, *, local_files_only):
        calls.append((repo_id, local_files_only))
        if repo_id == "mistralai/cached":
            return str(folder)
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(builder.huggingface_hub, "snapshot_download", snapshot_download)
    assert ClusterConfig.create(model="mistralai/cached").model == str(folder)
    with pytest.raises(SetupError, match="not in the Hugging Face cache.*downloads nothing"):
        ClusterConfig.create(model="mistralai/missing")
    ClusterConfig.create(model="mistralai/cached", download=True)
    assert calls == [("mistralai/cached", True), ("mistralai/missing", True), ("mistralai/cached", False)]


def test_kv_blocks_from_memory_and_from_the_batch(tmp_path):
    folder = write_tiny_model(tmp_path, SPEC)
    mc = ModelConfig.from_dir(folder)
    config = ClusterConfig.create(model=str(folder), max_num_seqs=4, block_size=16)
    assert kv_blocks(config, mc, max_model_len=100) == 4 * 7  # 100 positions -> 7 blocks each
    per_block = 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 4
    sized = config.model_copy(update={"kv_cache_memory_gb": 100 * per_block / 2**30})
    assert kv_blocks(sized, mc, max_model_len=100) == 100
    assert kv_blocks(config.model_copy(update={"num_kv_blocks": 9}), mc, max_model_len=100) == 9
