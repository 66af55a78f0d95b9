"""``quantization_config`` as each tool writes it becomes one QuantizationConfig (no torch); what mixserve cannot
run is a ConfigError naming the field; quantize-on-load is an option (config field, CLI flag) that a quantized
checkpoint of another kind refuses."""

from __future__ import annotations

import argparse
import json

import pytest

from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.config.options import add_options
from cluster.config.quantization import QuantizationConfig, check_on_load, on_load_scheme
from cluster.errors import ConfigError, SetupError

EXPERT = "model.layers.0.block_sparse_moe.experts.3.w1"
GATE = "model.layers.1.block_sparse_moe.gate"
Q_PROJ = "model.layers.1.self_attn.q_proj"


def ct_config(scheme: str, **extra) -> dict:
    """What compressed-tensors itself serializes for a preset scheme (its QuantizationConfig.model_dump)."""
    from compressed_tensors.quantization import QuantizationConfig as CT
    from compressed_tensors.quantization import preset_name_to_scheme

    groups = {"group_0": preset_name_to_scheme(scheme, ["Linear"])}
    d = CT(config_groups=groups, ignore=["lm_head", "re:.*block_sparse_moe\\.gate$"], **extra).model_dump()
    return {**d, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


@pytest.mark.parametrize(
    ("preset", "fmt", "kind", "strategy", "group", "acts"),
    [
        ("W4A16", "pack-quantized", "int4", "group", 128, None),
        ("W8A16", "pack-quantized", "int8", "group", 128, None),
        ("FP8", "float-quantized", "fp8", "tensor", None, (False, "tensor")),
        ("FP8_DYNAMIC", "float-quantized", "fp8", "channel", None, (True, "token")),
        ("W8A8", "naive-quantized", "int8", "channel", None, (True, "token")),
    ],
)
def test_compressed_tensors_presets(preset, fmt, kind, strategy, group, acts):
    stored = "int-quantized" if fmt == "naive-quantized" else fmt  # compressed-tensors' name for w8a8 int
    q = QuantizationConfig.from_dict(ct_config(preset, format=stored), source="config.json")
    scheme = q.scheme_for(EXPERT)
    assert q.method == "compressed-tensors" and scheme is not None
    assert (scheme.format, scheme.kind, scheme.strategy, scheme.group_size) == (fmt, kind, strategy, group)
    assert (None if scheme.activations is None else (scheme.activations.dynamic, scheme.activations.strategy)) == acts
    assert q.scheme_for(GATE) is None and q.scheme_for("lm_head") is None  # the ignore list, regex and name
    assert q.scheme_for(Q_PROJ) == scheme  # "Linear" targets attention too


def test_group_targets_first_match_and_group_format():
    d = ct_config("W4A16", format="pack-quantized")
    d["config_groups"] = {
        "experts": {**d["config_groups"]["group_0"], "targets": ["re:.*experts.*"]},
        "attention": {
            "targets": ["re:.*self_attn.*"],
            "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
        },
    }
    q = QuantizationConfig.from_dict(d, source="c")
    assert q.scheme_for(EXPERT).kind == "int4"  # type: ignore[union-attr]
    assert q.scheme_for(Q_PROJ).format == "float-quantized"  # type: ignore[union-attr]
    assert q.scheme_for(GATE) is None


def test_fp8_gptq_awq():
    fp8 = QuantizationConfig.from_dict(
        {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head", GATE]}, source="c"
    )
    s = fp8.scheme_for(EXPERT)
    assert s is not None and (s.kind, s.strategy, s.activations.dynamic) == ("fp8", "tensor", False)  # type: ignore[union-attr]
    assert fp8.scheme_for(GATE) is None and fp8.scheme_for("model.layers.0.block_sparse_moe.gate") is not None
    gptq = QuantizationConfig.from_dict(
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False}, source="c"
    )
    g = gptq.scheme_for(EXPERT)
    assert gptq.by_files and g is not None
    assert (g.group_size, g.g_idx, g.zero_offset, g.symmetric) == (128, True, 1, False)
    v2 = QuantizationConfig.from_dict(
        {"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}, source="c"
    ).scheme_for(EXPERT)
    assert v2 is not None and (v2.kind, v2.strategy, v2.group_size, v2.zero_offset) == ("int8", "channel", None, 0)
    awq = QuantizationConfig.from_dict(
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM",
         "modules_to_not_convert": ["gate"]}, source="c",
    )  # fmt: skip
    assert awq.scheme_for(EXPERT).format == "awq" and awq.scheme_for(GATE) is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
        ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme"),
        ({"quantization_status": "frozen"}, "quantization_status"),
        ({"format": "marlin-24"}, "format 'marlin-24'"),
        ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 3, "type": "int"}}}}, "int 3-bit"),
        ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "block"}}}}, "block"),
        ({"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group"}}}},
         "group_size"),
    ],
)  # fmt: skip
def test_compressed_tensors_refusals_name_the_field(change, names):
    with pytest.raises(ConfigError, match=names):
        QuantizationConfig.from_dict({**ct_config("W4A16", format="pack-quantized"), **change}, source="config.json")


@pytest.mark.parametrize(
    ("d", "names"),
    [
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits 3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "GEMM"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero points"),
    ],
)
def test_other_method_refusals(d, names):
    with pytest.raises(ConfigError, match=names):
        QuantizationConfig.from_dict(d, source="config.json")


@pytest.mark.parametrize("style", ["v4", "v5"])
def test_model_config_reads_it_in_both_config_styles(tmp_path, style):
    """A quantized config.json in transformers 4.x style (rope_theta, torch_dtype) and 5.x style (rope_parameters,
    dtype, head_dim null): the rope theta is read, not defaulted, and the quantization comes along."""
    d = {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "quantization_config": ct_config("W4A16", format="pack-quantized"),
    }  # fmt: skip
    if style == "v4":
        d.update(rope_theta=123456.0, torch_dtype="bfloat16")
    else:
        d.update(rope_parameters={"rope_theta": 123456.0, "rope_type": "default"}, dtype="bfloat16", head_dim=None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = ModelConfig.from_dir(tmp_path)
    assert c.rope_theta == 123456.0 and c.head_dim == 16
    assert c.quantization is not None and c.quantization.scheme_for(EXPERT).kind == "int4"  # type: ignore[union-attr]
    assert ModelConfig.from_hf_dict({k: v for k, v in d.items() if k != "quantization_config"}).quantization is None


def test_quantization_is_an_option_and_a_flag():
    assert ClusterConfig.create(quantization="int4").load.quantization == "int4"
    assert ClusterConfig.create().load.quantization is None
    with pytest.raises(SetupError, match="quantization"):
        ClusterConfig.create(quantization="int3")
    parser = argparse.ArgumentParser()
    add_options(parser, ClusterConfig)
    assert parser.parse_args(["--quantization", "fp8"]).quantization == "fp8"


def test_on_load_schemes_and_conflicts():
    assert [on_load_scheme(k).kind for k in ("int8", "int4", "fp8")] == ["int8", "int4", "fp8"]
    assert on_load_scheme("int4").group_size == 128
    int4 = QuantizationConfig.from_dict(ct_config("W4A16", format="pack-quantized"), source="c")
    check_on_load(int4, "int4", folder="m")  # the checkpoint's own kind: nothing to do
    check_on_load(None, "int8", folder="m")
    check_on_load(int4, None, folder="m")
    with pytest.raises(ConfigError, match="quantization='int8' conflicts with the checkpoint's own compressed-tensors"):
        check_on_load(int4, "int8", folder="m")
