"""Strict, role-aware checkpoint loading: layouts, roles, dtypes, errors, the Mistral rotary permutation."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cluster.checkpoint.load as ckpt
from cluster.checkpoint.files import checkpoint_nbytes, discover
from cluster.checkpoint.load import LoadRole, expected_shapes, load_tensors, parse_dtype
from cluster.checkpoint.names import mistral_to_hf_name, permute_rotary, unpermute_rotary
from cluster.checkpoint.tiny_model import TinyModelSpec, random_weights, write_checkpoint, write_tiny_model
from cluster.config.model import ModelConfig
from cluster.errors import CheckpointError

SPEC = TinyModelSpec(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, experts=4)
CONFIG = SPEC.config()
REF = random_weights(CONFIG, seed=0)
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w[123]\.weight$")
EXPERT_NAMES = {k for k in REF if EXPERT_RE.match(k)}
NON_EXPERT_NAMES = set(REF) - EXPERT_NAMES


def load(folder, config=CONFIG, role=None, **kw):
    kw.setdefault("progress", False)
    return load_tensors(folder, config, role=role or LoadRole.everything(config), **kw)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def raises(*words: str):
    """pytest.raises(CheckpointError) whose message contains every one of ``words`` (literally)."""
    pattern = "".join(f"(?=.*{re.escape(w)})" for w in words)
    return pytest.raises(CheckpointError, match=f"(?s){pattern}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("hf"), SPEC, seed=0)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("sharded"), SPEC, seed=0, shards=3)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("mistral"), SPEC, seed=0, fmt="mistral")


class ReadSpy:
    """Wraps ``safe_open`` in cluster.checkpoint.load and records every tensor whose data is read."""

    def __init__(self, monkeypatch):
        self.read: list[str] = []
        self.opened: list[str] = []
        real = ckpt.safe_open
        spy = self

        class Handle:
            def __init__(self, path, framework, **kw):
                self._h = real(path, framework=framework, **kw)
                spy.opened.append(Path(path).name)

            def __enter__(self):
                self._f = self._h.__enter__()
                return self

            def __exit__(self, *exc):
                return self._h.__exit__(*exc)

            def get_tensor(self, name):
                spy.read.append(name)
                return self._f.get_tensor(name)

            def get_slice(self, name):
                spy.read.append(name)
                return self._f.get_slice(name)

            def __getattr__(self, name):  # keys(), metadata(), ...
                return getattr(self._f, name)

        monkeypatch.setattr(ckpt, "safe_open", Handle)


# ---------------------------------------------------------------------- layouts
def test_single_file_everything(hf_dir):
    assert discover(hf_dir).layout == "hf"
    assert_same(load(hf_dir), REF)


def test_sharded_everything(sharded_dir):
    files = discover(sharded_dir)
    assert files.layout == "hf" and len(set(files.tensor_files.values())) == 3
    assert_same(load(sharded_dir), REF)


def test_bf16_checkpoint(tmp_path):
    write_tiny_model(tmp_path, SPEC, seed=0, dtype=torch.bfloat16)
    assert_same(load(tmp_path, dtype="bfloat16"), {k: v.to(torch.bfloat16) for k, v in REF.items()})
    assert_same(load(tmp_path, dtype="float32"), {k: v.to(torch.bfloat16).float() for k, v in REF.items()})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", torch.float16, torch.bfloat16])
def test_dtype_at_load(hf_dir, dtype):
    want = parse_dtype(dtype)
    got = load(hf_dir, dtype=dtype)
    assert_same(got, {k: v.to(want) for k, v in REF.items()})
    assert all(t.is_contiguous() for t in got.values())


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", "", torch.float64, torch.int8])
def test_bad_dtype(hf_dir, dtype):
    with pytest.raises(ValueError, match=re.escape(str(dtype)) + ".*not supported"):
        load(hf_dir, dtype=dtype)


def test_tied_embeddings(tmp_path):
    spec = TinyModelSpec(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, experts=4, tie_word_embeddings=True)
    cfg = spec.config()
    write_tiny_model(tmp_path, spec, seed=1)
    got = load(tmp_path, cfg, role=LoadRole.frontend())
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got
    # A tied checkpoint that stores lm_head anyway (as some exporters do) still loads; the copy is skipped.
    tensors = random_weights(cfg, seed=1)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path / "with_head", cfg, tensors)
    assert "lm_head.weight" not in load(tmp_path / "with_head", cfg)


def test_head_dim_not_hidden_over_heads(tmp_path):
    spec = TinyModelSpec(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=16, layers=1, experts=2)
    cfg = spec.config()
    write_tiny_model(tmp_path / "hf", spec, seed=3)
    write_tiny_model(tmp_path / "mistral", spec, seed=3, fmt="mistral")
    ref = random_weights(cfg, seed=3)
    assert ref["model.layers.0.self_attn.q_proj.weight"].shape == (64, 32)
    assert_same(load(tmp_path / "hf", cfg), ref)
    assert_same(load(tmp_path / "mistral", cfg), ref)


# ---------------------------------------------------------------------- roles
def test_frontend_role(hf_dir):
    got = load(hf_dir, role=LoadRole.frontend())
    assert set(got) == NON_EXPERT_NAMES
    assert_same(got, {k: REF[k] for k in NON_EXPERT_NAMES})


def test_expert_shard_role(hf_dir):
    got = load(hf_dir, role=LoadRole.expert_shard({(0, 1), (1, 3)}))
    want = {
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
        for i, e in ((0, 1), (1, 3))
        for w in ("w1", "w2", "w3")
    }
    assert want <= EXPERT_NAMES  # real tensor names of this config, not a typo that would load nothing
    assert_same(got, {k: REF[k] for k in want})


def test_empty_role_loads_nothing(hf_dir):
    assert load(hf_dir, role=LoadRole()) == {}


def test_roles_partition_the_checkpoint(sharded_dir):
    shards = [LoadRole.frontend()] + [
        LoadRole.expert_shard({(i, e) for i in range(2) for e in (2 * w, 2 * w + 1)}) for w in range(2)
    ]
    parts = [load(sharded_dir, role=r) for r in shards]
    assert sum(len(p) for p in parts) == len(REF)
    assert_same({k: v for p in parts for k, v in p.items()}, REF)


@pytest.mark.parametrize("layout", ["hf", "sharded", "mistral"])
@pytest.mark.parametrize("which", ["frontend", "experts"])
def test_role_reads_only_its_tensors(request, monkeypatch, layout, which):
    folder = request.getfixturevalue({"hf": "hf_dir", "sharded": "sharded_dir", "mistral": "mistral_dir"}[layout])
    spy = ReadSpy(monkeypatch)
    role = LoadRole.frontend() if which == "frontend" else LoadRole.expert_shard({(0, 1), (1, 3)})
    got = load(folder, role=role)
    assert spy.opened, "the spy is not in the loader's path"
    assert len(spy.read) == len(set(spy.read)) == len(got)  # each wanted tensor read once, nothing else
    if layout == "mistral":
        assert all(not k.startswith("model.") for k in spy.read)  # stored (Mistral) names
        assert set(got) == {mistral_to_hf_name(k) for k in spy.read}
    else:
        assert set(spy.read) == set(got)
    if which == "experts":
        assert all("experts" in k for k in spy.read)
    else:
        assert not any("experts" in k for k in spy.read)


def test_expert_shard_reads_only_needed_shards(monkeypatch, tmp_path):
    # One expert per shard file: an expert worker must open no file for data beyond its own (headers aside).
    write_tiny_model(tmp_path, SPEC, seed=0, shards=4)
    spy = ReadSpy(monkeypatch)
    load(tmp_path, role=LoadRole.expert_shard({(1, 0)}))
    assert sorted(spy.read) == [f"model.layers.1.block_sparse_moe.experts.0.w{j}.weight" for j in (1, 2, 3)]


@pytest.mark.parametrize("pair", [(2, 0), (0, 4), (-1, 0)])
def test_role_outside_the_model(hf_dir, pair):
    with raises(str(hf_dir), str(pair)):
        load(hf_dir, role=LoadRole.expert_shard({(0, 0), pair}))


# ---------------------------------------------------------------------- transformers' own checkpoint
def test_transformers_sharded_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tc = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(tc)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1 and not (tmp_path / "model.safetensors").exists()

    # Independent reference: the saved files, read with safetensors directly.
    on_disk: dict[str, torch.Tensor] = {}
    for name in shard_files:
        on_disk.update(load_file(str(tmp_path / name)))
    assert set(on_disk) == set(index["weight_map"])

    config = ModelConfig.from_dir(tmp_path)
    assert set(on_disk) == set(expected_shapes(config))
    got = load(tmp_path, config)
    assert_same(got, on_disk)

    # And the model's own (fused, in transformers v5) parameters.
    state = model.state_dict()
    f = tc.intermediate_size
    for i in range(tc.num_hidden_layers):
        p = f"model.layers.{i}."
        fused = p + "mlp.experts.gate_up_proj"
        for e in range(tc.num_local_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            if fused in state:  # transformers v5
                assert torch.equal(got[q + "w1.weight"], state[fused][e, :f])
                assert torch.equal(got[q + "w3.weight"], state[fused][e, f:])
                assert torch.equal(got[q + "w2.weight"], state[p + "mlp.experts.down_proj"][e])
            else:  # transformers v4
                for w in ("w1", "w2", "w3"):
                    assert torch.equal(got[q + w + ".weight"], state[q + w + ".weight"])
        gate = state.get(p + "mlp.gate.weight", state.get(p + "block_sparse_moe.gate.weight"))
        assert torch.equal(got[p + "block_sparse_moe.gate.weight"], gate)
        assert torch.equal(got[p + "self_attn.q_proj.weight"], state[p + "self_attn.q_proj.weight"])
    assert torch.equal(got["lm_head.weight"], state["lm_head.weight"])

    front = load(tmp_path, config, role=LoadRole.frontend())
    assert not any("experts" in k for k in front) and "model.layers.1.block_sparse_moe.gate.weight" in front
    shard = load(tmp_path, config, role=LoadRole.expert_shard({(1, 2)}))
    assert set(shard) == {f"model.layers.1.block_sparse_moe.experts.2.w{j}.weight" for j in (1, 2, 3)}


# ---------------------------------------------------------------------- strict errors
def write(folder: Path, tensors: dict[str, torch.Tensor], **kw) -> Path:
    return write_checkpoint(folder, CONFIG, tensors, **kw)


@pytest.mark.parametrize(
    "name",
    ["model.layers.1.self_attn.k_proj.weight", "lm_head.weight", "model.layers.0.block_sparse_moe.experts.3.w2.weight"],
)
@pytest.mark.parametrize("role", ["everything", "frontend", "expert"])
def test_missing_tensor(tmp_path, name, role):
    tensors = dict(REF)
    del tensors[name]
    write(tmp_path, tensors)
    r = {"everything": None, "frontend": LoadRole.frontend(), "expert": LoadRole.expert_shard({(0, 0)})}[role]
    with raises(str(tmp_path), repr(name), "missing"):
        load(tmp_path, role=r)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.block_sparse_moe.experts.4.w1.weight",  # one expert too many
        "model.layers.2.input_layernorm.weight",  # one layer too many
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "lm_head.bias",
    ],
)
def test_unexpected_tensor(tmp_path, extra):
    write(tmp_path, {**REF, extra: torch.zeros(8)})
    with raises(str(tmp_path / "model.safetensors"), repr(extra), "unexpected"):
        load(tmp_path, role=LoadRole.frontend())


@pytest.mark.parametrize(
    ("name", "shape", "role"),
    [
        ("model.layers.1.self_attn.q_proj.weight", (32, 33), LoadRole.frontend()),
        ("model.norm.weight", (31,), LoadRole.frontend()),
        ("model.layers.0.block_sparse_moe.gate.weight", (3, 32), LoadRole.frontend()),
        ("model.layers.1.block_sparse_moe.experts.2.w2.weight", (64, 32), LoadRole.expert_shard({(1, 2)})),
    ],
)
def test_wrong_shape(tmp_path, name, shape, role):
    write(tmp_path, {**REF, name: torch.zeros(shape)}, shards=2)
    files = discover(tmp_path)
    with raises(str(files.tensor_files[name]), repr(name), str(shape), str(tuple(REF[name].shape))):
        load(tmp_path, role=role)
    with raises(repr(name), str(shape)):
        load(tmp_path)


def test_int_tensor(tmp_path):
    write(tmp_path, {**REF, "model.norm.weight": torch.arange(32, dtype=torch.int32)})
    # write_checkpoint casts to its dtype, so rewrite the file with the integer tensor kept.
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.arange(32, dtype=torch.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with raises(str(tmp_path / "model.safetensors"), "'model.norm.weight'", "int32"):
        load(tmp_path, role=LoadRole.frontend())


def _past_the_end(path: Path) -> set[str]:
    """Tensors whose bytes, by the file's own header, lie past its end (independent of the loader)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return {k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > len(raw) - 8 - n}


@pytest.mark.parametrize("cut", [1, 4096, 5_000_000])
def test_truncated_file(tmp_path, cut):
    write(tmp_path, REF)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-cut])
    cut_off = _past_the_end(path)
    assert cut_off
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as e:
        load(tmp_path, role=LoadRole.frontend())
    named = re.search(r"tensor '([^']+)'", str(e.value))
    assert named and named.group(1) in cut_off, str(e.value)


def test_truncated_shard(tmp_path):
    write(tmp_path, REF, shards=3)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=re.escape(str(shard))) as e:
        load(tmp_path, role=LoadRole.expert_shard({(0, 0)}))
    assert re.search(r"tensor '([^']+)'", str(e.value)).group(1) in _past_the_end(shard)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        b"not a safetensors file at all" * 10,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!}",
        b"\x01\x02",
        b"",
        b"\xff" * 8 + b"{}",
    ],
)
def test_corrupt_header(tmp_path, garbage):
    write(tmp_path, REF)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(garbage + raw[len(garbage) :] if len(garbage) > 8 else garbage)
    with raises(str(path), "not a readable safetensors file"):
        load(tmp_path)


def _evil_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when (and only when) it is unpickled."""

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps({"model.norm.weight": Evil()})


@pytest.fixture
def no_unpickling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the loader unpickled a file")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth", "model.pt"])
def test_pickle_only_folder(tmp_path, no_unpickling, name):
    marker = tmp_path / "UNPICKLED"
    (tmp_path / name).write_bytes(_evil_pickle(marker))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    with raises(str(tmp_path / name), "pickle"):
        load(tmp_path)
    assert not marker.exists()


def _edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_names_bin_shard(tmp_path, no_unpickling):
    write(tmp_path, REF, shards=2)
    marker = tmp_path / "UNPICKLED"
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(_evil_pickle(marker))
    name = "model.layers.1.self_attn.o_proj.weight"
    _edit_index(tmp_path, lambda wm: wm.update({name: "pytorch_model-00002-of-00002.bin"}))
    with raises(str(tmp_path / "pytorch_model-00002-of-00002.bin"), repr(name), "pickle"):
        load(tmp_path)
    assert not marker.exists()


def test_index_names_missing_shard(tmp_path):
    write(tmp_path, REF, shards=2)
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    _edit_index(tmp_path, lambda wm: wm.update({name: "model-00003-of-00003.safetensors"}))
    with raises(str(tmp_path / "model-00003-of-00003.safetensors"), repr(name), "does not exist"):
        load(tmp_path, role=LoadRole.frontend())


def test_index_names_tensor_the_shard_lacks(tmp_path):
    write(tmp_path, REF, shards=2)
    name = "model.layers.0.block_sparse_moe.experts.9.w1.weight"
    _edit_index(tmp_path, lambda wm: wm.update({name: "model-00002-of-00002.safetensors"}))
    with raises(str(tmp_path / "model-00002-of-00002.safetensors"), repr(name), "not in the file"):
        load(tmp_path)


def test_index_maps_tensor_to_the_wrong_shard(tmp_path):
    write(tmp_path, REF, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = next(k for k, v in index["weight_map"].items() if v == "model-00001-of-00002.safetensors")
    _edit_index(tmp_path, lambda wm: wm.update({name: "model-00002-of-00002.safetensors"}))
    with raises(str(tmp_path / "model-00002-of-00002.safetensors"), repr(name)):
        load(tmp_path)


def test_index_omits_a_stored_tensor(tmp_path):
    write(tmp_path, REF, shards=2)
    name = "model.layers.1.post_attention_layernorm.weight"
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][name]
    _edit_index(tmp_path, lambda wm: wm.pop(name))
    with raises(str(tmp_path / shard), repr(name)):
        load(tmp_path)


def test_shard_holds_a_tensor_the_index_does_not_map_to_it(tmp_path):
    # Every tensor is present and mapped, but shard 2 also carries a second (different) copy of one of shard 1's.
    write(tmp_path, REF, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = next(k for k, v in index["weight_map"].items() if v == "model-00001-of-00002.safetensors")
    shard2 = tmp_path / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard2))
    tensors[name] = torch.zeros_like(REF[name])
    save_file(tensors, str(shard2))
    with raises(str(shard2), repr(name), "unexpected"):
        load(tmp_path)


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"metadata": {}}', '{"weight_map": [1]}', '{"weight_map": {"model.norm.weight": 3}}'],
)
def test_bad_index(tmp_path, text):
    write(tmp_path, REF, shards=2)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with raises(str(tmp_path / "model.safetensors.index.json")):
        load(tmp_path)


def test_index_shard_outside_the_folder(tmp_path):
    write(tmp_path / "ckpt", REF, shards=2)
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").rename(tmp_path / "elsewhere.safetensors")
    _edit_index(
        tmp_path / "ckpt", lambda wm: wm.update({k: "../elsewhere.safetensors" for k, v in wm.items() if "2" in v})
    )
    with raises("../elsewhere.safetensors", "plain file name"):
        load(tmp_path / "ckpt")


def test_no_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with raises(str(tmp_path), "model.safetensors"):
        load(tmp_path)
    with raises(str(tmp_path / "nope"), "does not exist"):
        load(tmp_path / "nope")


def test_consolidated_tensor_stored_twice(tmp_path):
    write_tiny_model(tmp_path, SPEC, seed=0, fmt="mistral", shards=2)
    first = tmp_path / "consolidated-00001-of-00002.safetensors"
    second = tmp_path / "consolidated-00002-of-00002.safetensors"
    t1 = load_file(str(first))
    dup = next(iter(t1))
    save_file({**load_file(str(second)), dup: t1[dup]}, str(second))
    with raises(repr(dup), "twice"):
        load(tmp_path)


def test_mistral_missing_and_unexpected_use_stored_names(tmp_path):
    write_tiny_model(tmp_path, SPEC, seed=0, fmt="mistral")
    path = tmp_path / "consolidated.safetensors"
    tensors = load_file(str(path))
    del tensors["layers.1.attention.wk.weight"]
    save_file(tensors, str(path))
    with raises(str(tmp_path), "'layers.1.attention.wk.weight'", "missing"):
        load(tmp_path)
    tensors["layers.1.attention.wk.weight"] = torch.zeros(16, 32)
    tensors["layers.0.feed_forward.w1.weight"] = torch.zeros(64, 32)  # a dense FFN name: not Mixtral
    save_file(tensors, str(path))
    with raises(str(path), "'layers.0.feed_forward.w1.weight'", "unexpected"):
        load(tmp_path)


# ---------------------------------------------------------------------- original Mistral layout
@pytest.mark.parametrize("shards", [1, 2])
def test_mistral_layout_equals_hf_layout(tmp_path, hf_dir, shards):
    write_tiny_model(tmp_path, SPEC, seed=0, fmt="mistral", shards=shards)
    assert discover(tmp_path).layout == "mistral"
    assert ModelConfig.from_dir(tmp_path).checkpoint_format == "mistral"
    stored = {}
    for f in sorted(tmp_path.glob("consolidated*.safetensors")):
        stored.update(load_file(str(f)))
    assert "layers.0.attention.wq.weight" in stored and not any(k.startswith("model.") for k in stored)
    # The stored wq/wk really are in the other (interleaved) row order, so the loader's permutation matters ...
    assert not torch.equal(stored["layers.0.attention.wq.weight"], REF["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(stored["layers.1.attention.wk.weight"], REF["model.layers.1.self_attn.k_proj.weight"])
    # ... while everything else is stored as is.
    assert torch.equal(stored["layers.0.attention.wv.weight"], REF["model.layers.0.self_attn.v_proj.weight"])
    assert_same(load(tmp_path), load(hf_dir))
    assert_same(load(tmp_path, dtype="bfloat16"), load(hf_dir, dtype="bfloat16"))


def test_mistral_layout_roles(mistral_dir):
    front = load(mistral_dir, role=LoadRole.frontend())
    assert_same(front, {k: REF[k] for k in NON_EXPERT_NAMES})
    experts = load(mistral_dir, role=LoadRole.expert_shard({(0, 1), (1, 3)}))
    assert set(experts) == {k for k in EXPERT_NAMES if re.search(r"layers\.0\.block_sparse_moe\.experts\.1\.", k)} | {
        k for k in EXPERT_NAMES if re.search(r"layers\.1\.block_sparse_moe\.experts\.3\.", k)
    }


# Independent reference implementations of the two RoPE conventions.
def mistral_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """mistral-inference: interleaved pairs (x0, x1), (x2, x3) ... rotated as complex numbers. x: (seq, heads, dim)."""
    dim = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    freqs_cis = torch.polar(torch.ones(len(positions), dim // 2), torch.outer(positions.float(), freqs))
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_ * freqs_cis[:, None, :]).flatten(-2)


def hf_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face: rotate-half over (first half, second half) of each head. x: (seq, heads, dim)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

    def rotate_half(t):
        return torch.cat((-t[..., dim // 2 :], t[..., : dim // 2]), dim=-1)

    return x * cos + rotate_half(x) * sin


def scores(q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """q.k per query head (GQA), shape (heads, seq, seq)."""
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    return torch.einsum("ihd,jhd->hij", q, k)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 8), (4, 2, 16), (8, 8, 4), (32, 8, 128)])
def test_permute_rotary_matches_the_two_rope_conventions(heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * 1000 + head_dim)
    hidden, theta = 64, 1e6
    wq = torch.randn(heads * head_dim, hidden, generator=g) / hidden**0.5
    wk = torch.randn(kv_heads * head_dim, hidden, generator=g) / hidden**0.5
    x = torch.randn(7, hidden, generator=g)
    positions = torch.tensor([0, 1, 2, 5, 100, 4095, 32767])

    def project(w, n):
        return (x @ w.T).view(len(positions), n, head_dim)

    q_m = mistral_rope(project(wq, heads), positions, theta)
    k_m = mistral_rope(project(wk, kv_heads), positions, theta)
    q_h = hf_rope(project(permute_rotary(wq, heads), heads), positions, theta)
    k_h = hf_rope(project(permute_rotary(wk, kv_heads), kv_heads), positions, theta)
    want = scores(q_m, k_m, heads, kv_heads)
    torch.testing.assert_close(scores(q_h, k_h, heads, kv_heads), want, atol=1e-5, rtol=1e-5)
    # Each HF head is the Mistral head with its rows regrouped: same rotated vectors up to that regrouping.
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    torch.testing.assert_close(q_h, q_m[..., perm], atol=1e-5, rtol=1e-5)
    # Sanity: without the permutation the scores differ, so the check has teeth.
    q_bad = hf_rope(project(wq, heads), positions, theta)
    k_bad = hf_rope(project(wk, kv_heads), positions, theta)
    assert not torch.allclose(scores(q_bad, k_bad, heads, kv_heads), want, atol=1e-3)


@pytest.mark.parametrize(("rows", "n_heads"), [(32, 4), (16, 2), (64, 4), (8, 1), (4096, 32)])
def test_permute_unpermute_inverse(rows, n_heads):
    w = torch.randn(rows, 5)
    assert torch.equal(permute_rotary(unpermute_rotary(w, n_heads), n_heads), w)
    assert torch.equal(unpermute_rotary(permute_rotary(w, n_heads), n_heads), w)
    if rows // n_heads > 2:
        assert not torch.equal(permute_rotary(w, n_heads), w)


def test_permute_rotary_row_order():
    # One head of dim 6: rows (x0, y0, x1, y1, x2, y2) -> (x0, x1, x2, y0, y1, y2).
    w = torch.arange(6.0)[:, None]
    assert permute_rotary(w, 1).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert permute_rotary(torch.arange(12.0)[:, None], 2).flatten().tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]


# ---------------------------------------------------------------------- progress
def test_progress_line(hf_dir, capsys):
    got = load_tensors(hf_dir, CONFIG, role=LoadRole.frontend(), progress=True, label="frontend")
    err = capsys.readouterr().err
    n = len(got)
    assert "[mixserve] loading frontend:" in err
    assert f"{n}/{n} tensors" in err and err.endswith("\n")


def test_progress_default_is_on_and_can_be_off(hf_dir, capsys):
    load_tensors(hf_dir, CONFIG, role=LoadRole.expert_shard({(0, 0)}))
    assert "3/3 tensors" in capsys.readouterr().err
    load_tensors(hf_dir, CONFIG, role=LoadRole.frontend(), progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_checkpoint_nbytes(sharded_dir):
    total = sum(p.stat().st_size for p in sharded_dir.glob("*.safetensors"))
    assert checkpoint_nbytes(sharded_dir) == total
    assert total > sum(t.numel() * 4 for t in REF.values())


def test_safe_open_is_what_we_spy_on():
    # The spy above patches cluster.checkpoint.load.safe_open; make sure that is the safetensors function.
    assert ckpt.safe_open is safe_open
