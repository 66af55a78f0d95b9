"""Building from a config: model folders and Hugging Face ids from the local cache, dtype auto, KV-cache sizing."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from cluster.checkpoint.locate import resolve
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.config.cluster import ClusterConfig
from cluster.config.dtype import FAST_BF16_ENV, checkpoint_dtype, cpu_has_fast_bf16, resolve_dtype
from cluster.config.model import ModelConfig
from cluster.errors import SetupError
from cluster.runtime.frontend import kv_blocks

SPEC = TinyModelSpec(hidden=32, intermediate=64, layers=1, experts=4)


def set_saved_dtype(folder, dtype):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("saved", "device", "want_fast", "want_slow"),
    [
        ("float32", "cpu", "float32", "float32"),
        ("bfloat16", "cpu", "bfloat16", "float32"),
        ("float16", "cpu", "float32", "float32"),
        ("bfloat16", "cuda", "bfloat16", "bfloat16"),
        ("float16", "cuda", "float16", "float16"),
        ("bfloat16", "cuda:1", "bfloat16", "bfloat16"),
    ],
)
def test_dtype_auto_follows_the_checkpoint(tmp_path, fast_bf16, saved, device, want_fast, want_slow):
    """Under both answers of cpu_has_fast_bf16 (forced by $MIXSERVE_CPU_FAST_BF16, see the fast_bf16 fixture)."""
    folder = write_tiny_model(tmp_path, SPEC)
    set_saved_dtype(folder, saved)
    assert cpu_has_fast_bf16() is fast_bf16
    assert resolve_dtype("auto", str(folder), device) == (want_fast if fast_bf16 else want_slow)
    assert resolve_dtype("float16", str(folder), device) == "float16"  # an explicit dtype is kept


def test_the_original_layout_is_bfloat16_and_a_config_without_dtype_float32(tmp_path, fast_bf16):
    (tmp_path / "mistral").mkdir()
    assert checkpoint_dtype(tmp_path / "mistral") == "bfloat16"  # no config.json: the original release's dtype
    folder = write_tiny_model(tmp_path / "hf", SPEC)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_dtype(folder) == "float32"
    set_saved_dtype(folder, "torch.bfloat16")
    assert resolve_dtype("auto", folder, "cpu") == ("bfloat16" if fast_bf16 else "float32")


def test_fast_bf16_is_forced_by_the_environment_or_read_from_the_cpu(monkeypatch):
    for value, want in (("1", True), ("true", True), ("0", False), ("FALSE", False)):
        monkeypatch.setenv(FAST_BF16_ENV, value)
        assert cpu_has_fast_bf16() is want
    monkeypatch.setenv(FAST_BF16_ENV, "sometimes")
    with pytest.raises(SetupError, match=f"{FAST_BF16_ENV}='sometimes': use 1 or 0"):
        cpu_has_fast_bf16()
    monkeypatch.delenv(FAST_BF16_ENV)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert cpu_has_fast_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_config_create_names_bad_fields_and_resolve_finds_the_folder(tmp_path):
    folder = write_tiny_model(tmp_path, SPEC)
    config = resolve(ClusterConfig.create(model=str(folder)))
    assert config.load.dtype == "float32" and config.load.model == str(folder)
    assert resolve(config) is config  # idempotent
    with pytest.raises(SetupError, match="max_num_seqs"):
        ClusterConfig.create(model=str(folder), max_num_seqs=True)
    with pytest.raises(SetupError, match="modle: unknown option"):
        ClusterConfig.create(modle=str(folder))
    with pytest.raises(SetupError, match="not a checkpoint folder"):
        resolve(ClusterConfig.create(model=str(tmp_path / "missing" / "deeper" / "x")))


def test_a_hugging_face_id_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    folder = write_tiny_model(tmp_path / "snap", SPEC)
    calls = []

    def snapshot_download(repo_id, *, local_files_only):
        calls.append((repo_id, local_files_only))
        if repo_id == "mistralai/cached":
            return str(folder)
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve(ClusterConfig.create(model="mistralai/cached")).load.model == str(folder)
    with pytest.raises(SetupError, match="not in the Hugging Face cache.*downloads nothing"):
        resolve(ClusterConfig.create(model="mistralai/missing"))
    resolve(ClusterConfig.create(model="mistralai/cached", download=True))
    assert calls == [("mistralai/cached", True), ("mistralai/missing", True), ("mistralai/cached", False)]


def test_kv_blocks_from_memory_and_from_the_batch(tmp_path):
    folder = write_tiny_model(tmp_path, SPEC)
    mc = ModelConfig.from_dir(folder)
    config = resolve(ClusterConfig.create(model=str(folder), max_num_seqs=4, block_size=16))
    assert kv_blocks(config, mc, max_model_len=100) == 4 * 7  # 100 positions -> 7 blocks each
    per_block = 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 4
    sized = config.with_options(kv_cache_memory_gb=100 * per_block / 2**30)
    assert kv_blocks(sized, mc, max_model_len=100) == 100
    assert kv_blocks(config.with_options(num_kv_blocks=9), mc, max_model_len=100) == 9
