"""Strict loading of quantized checkpoints written by their own tools (tests/quant_checkpoints.py): every format
dequantizes to exactly the writer's own numbers (compressed-tensors' decompression; the integers and scales GPTQ,
AWQ and AutoFP8 stored), each process reads only its tensors, experts stay quantized, and a checkpoint that is
off in any way is a CheckpointError naming the file and the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cluster.checkpoint.quant.read as read
from cluster.checkpoint.load import LoadRole, load_tensors
from cluster.config.model import ModelConfig
from cluster.errors import CheckpointError
from tests import quant_checkpoints as qc
from tests.helpers import hf_mixtral
from workers.expert import ExpertShard

WRITERS = {
    "ct-w4a16": lambda f: qc.write_compressed(f, "w4a16"),
    "ct-w4a16-asym": lambda f: qc.write_compressed(f, "w4a16-asym"),
    "ct-w8a16": lambda f: qc.write_compressed(f, "w8a16"),
    "ct-w8a8-naive": lambda f: qc.write_compressed(f, "w8a8-naive"),
    "ct-fp8": lambda f: qc.write_compressed(f, "fp8"),
    "ct-fp8-dynamic": lambda f: qc.write_compressed(f, "fp8-dynamic"),
    "autofp8": lambda f: qc.write_autofp8(f),
    "gptq": lambda f: qc.write_gptq(f),
    "gptq-desc-act": lambda f: qc.write_gptq(f, desc_act=True),
    "gptq-8bit-asym": lambda f: qc.write_gptq(f, bits=8, sym=False),
    "awq": lambda f: qc.write_awq(f),
}
W1 = "model.layers.0.block_sparse_moe.experts.1.w1"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (folder, the writer's dequantized state dict); every checkpoint from the same dense model."""
    out = {}
    for name, writer in WRITERS.items():
        folder = tmp_path_factory.mktemp(name)
        hf_mixtral(folder, seed=11)
        out[name] = (folder, writer(folder))
    return out


@pytest.mark.parametrize("name", list(WRITERS))
def test_dequantizes_to_the_writers_numbers_exactly(written, name):
    folder, reference = written[name]
    config = ModelConfig.from_dir(folder)
    got = load_tensors(folder, config, role=LoadRole.everything(config), dtype="float32", progress=False)
    assert set(got) == set(reference)
    for k, want in reference.items():
        assert torch.equal(got[k], want.float()), k


@pytest.mark.parametrize("name", list(WRITERS))
def test_experts_stay_quantized(written, name):
    folder, _ = written[name]
    config = ModelConfig.from_dir(folder)
    pairs = [(0, 0), (1, 3)]
    shard = ExpertShard.load(folder, config, pairs, dtype="float32", progress=False)
    dense_bytes = len(pairs) * config.expert_param_count() * 4
    assert shard.experts == pairs
    assert shard.nbytes() < 0.6 * dense_bytes  # int8 / fp8 ~ 0.27x, int4 ~ 0.2x of float32, scales included
    assert "dense" not in shard.describe()


def _spy(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = read.safe_open

    class Spy:
        def __init__(self, path, framework):
            self.handle = real(path, framework=framework)

        def __enter__(self):
            inner = self.handle.__enter__()

            class Recorder:
                def get_tensor(self, name):
                    seen.append(name)
                    return inner.get_tensor(name)

            return Recorder()

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(read, "safe_open", Spy)
    return seen


def test_each_role_reads_only_its_tensors(written, monkeypatch):
    folder, _ = written["ct-w4a16"]
    config = ModelConfig.from_dir(folder)
    seen = _spy(monkeypatch)
    load_tensors(folder, config, role=LoadRole.frontend(), progress=False)
    assert seen and not [n for n in seen if ".experts." in n]
    assert "model.layers.0.self_attn.q_proj.weight_packed" in seen  # attention is quantized too (dequantized here)
    seen.clear()
    ExpertShard.load(folder, config, [(0, 1)], progress=False)
    assert sorted({n.rsplit(".", 1)[0] for n in seen}) == [W1, W1.replace("w1", "w2"), W1.replace("w1", "w3")]


def _copy(written, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(written[name][0], dst)
    return dst


def _edit(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def _load_everything(folder: Path) -> None:
    config = ModelConfig.from_dir(folder)
    load_tensors(folder, config, role=LoadRole.everything(config), progress=False)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("ct-w4a16", lambda t: t.pop(W1 + ".weight_scale"),
         f"tensor '{W1}.weight_scale' is missing .*stores this module pack-quantized int4"),
        ("ct-w4a16", lambda t: t.update({W1 + ".weight_extra": torch.zeros(2)}),
         f"unexpected tensor '{W1}.weight_extra'"),
        ("ct-w4a16", lambda t: t.update({W1 + ".weight_packed": torch.zeros(128, 4, dtype=torch.int32)}),
         rf"tensor '{W1}.weight_packed' has shape \(128, 4\), expected \(128, 8\)"),
        ("ct-w4a16", lambda t: t.update({W1 + ".weight_packed": t[W1 + ".weight_packed"].long()}),
         f"tensor '{W1}.weight_packed' has dtype torch.int64; expected torch.int32"),
        ("ct-w4a16", lambda t: t.update({W1 + ".weight_shape": torch.tensor([128, 32])}),
         rf"module '{W1}': weight_shape is \[128, 32\], expected \[128, 64\]"),
        ("ct-fp8", lambda t: t.update({W1 + ".weight": t[W1 + ".weight"].float()}),
         f"tensor '{W1}.weight' has dtype torch.float32; expected torch.float8_e4m3fn"),
        ("ct-fp8", lambda t: t.update({W1 + ".weight_scale": torch.tensor([-1.0])}), "not a positive number"),
        ("gptq", lambda t: t.update({W1 + ".g_idx": torch.zeros(64, dtype=torch.int32)}),
         f"module '{W1}': g_idx does not give every group 32 input features"),
        ("gptq", lambda t: t.update({W1 + ".g_idx": torch.full((64,), 9, dtype=torch.int32)}), "outside 0..1"),
        ("ct-w8a8-naive", lambda t: t.update({W1 + ".weight": t[W1 + ".weight"].half()}),
         f"tensor '{W1}.weight' has dtype torch.float16; expected torch.int8"),
    ],
)  # fmt: skip
def test_broken_tensors_are_named(written, tmp_path, name, change, message):
    folder = _copy(written, name, tmp_path)
    _edit(folder, change)
    with pytest.raises(CheckpointError, match=message) as e:
        _load_everything(folder)
    assert str(folder) in str(e.value)


def test_a_module_stored_dense_where_the_config_says_quantized(written, tmp_path):
    folder = _copy(written, "ct-w4a16", tmp_path)

    def dense_w1(t):
        for suffix in ("weight_packed", "weight_scale", "weight_shape"):
            t.pop(f"{W1}.{suffix}")
        t[W1 + ".weight"] = torch.zeros(128, 64)

    _edit(folder, dense_w1)
    with pytest.raises(CheckpointError, match=f"'{W1}.weight_packed' is missing .*pack-quantized int4"):
        _load_everything(folder)
    # listed in the ignore list, it loads dense
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append(W1)
    (folder / "config.json").write_text(json.dumps(cfg))
    config = ModelConfig.from_dir(folder)
    got = load_tensors(folder, config, role=LoadRole.expert_shard([(0, 1)]), progress=False)
    assert torch.equal(got[W1 + ".weight"], torch.zeros(128, 64))


def test_a_quantized_module_the_config_leaves_dense(written, tmp_path):
    folder = _copy(written, "ct-w4a16", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append(W1)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"'{W1}.weight' is missing .*leaves this module dense"):
        _load_everything(folder)


def test_group_size_that_does_not_divide_the_features(written, tmp_path):
    folder = _copy(written, "gptq", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="input features do not split into groups of 48"):
        _load_everything(folder)


def test_fp8_kv_cache_scales_are_skipped_on_purpose(written, tmp_path):
    folder = _copy(written, "autofp8", tmp_path)
    _edit(folder, lambda t: t.update({"model.layers.0.self_attn.k_scale": torch.tensor(1.0)}))
    _load_everything(folder)
    folder = _copy(written, "ct-fp8", tmp_path / "ct")  # compressed-tensors has no such tensors
    _edit(folder, lambda t: t.update({"model.layers.0.self_attn.k_scale": torch.tensor(1.0)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.k_scale'"):
        _load_everything(folder)


def test_gptq_module_left_dense_is_read_dense(written, tmp_path):
    """GPTQ / AWQ: which modules are quantized is read from the stored names (the router gate here)."""
    folder = _copy(written, "awq", tmp_path)
    config = ModelConfig.from_dir(folder)
    got = load_tensors(folder, config, role=LoadRole.frontend(), progress=False)
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(got[gate], written["awq"][1][gate])
