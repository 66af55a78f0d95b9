"""ModelConfig: Hugging Face config.json (transformers v4 and v5 styles) and the original Mistral params.json."""

from __future__ import annotations

import copy
import json
import re

import pytest
import transformers

from cluster.config.model import ConfigError, ModelConfig

# Small sizes; hidden / heads = 8.
SMALL = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)

# The real Hugging Face mistralai/Mixtral-8x7B-v0.1 config.json (transformers v4 style).
MIXTRAL_8X7B_HF = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

# The original Mixtral-8x7B release's params.json.
MIXTRAL_8X7B_PARAMS = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-05,
    "vocab_size": 32000,
    "moe": {"num_experts_per_tok": 2, "num_experts": 8},
    "rope_theta": 1e6,
}

MIXTRAL_8X7B_TOTAL_PARAMS = 46_702_792_704


def v5_dict(**kw) -> dict:
    """config.json as transformers v5 writes it (``rope_parameters``), from transformers itself."""
    d = transformers.MixtralConfig(**{**SMALL, **kw}).to_dict()
    assert "rope_parameters" in d and "rope_theta" not in d  # the v5 style this test relies on
    return d


def v4_dict(**kw) -> dict:
    """The same config in transformers v4 style: ``rope_theta`` at the top level, no ``rope_parameters``."""
    d = v5_dict(**kw)
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope["rope_theta"]
    return d


def raises(*words: str):
    """pytest.raises(ConfigError) whose message contains every one of ``words`` (each as a whole word)."""
    pattern = "".join(rf"(?=.*(?<![\w.]){re.escape(w)}(?!\w))" for w in words)
    return pytest.raises(ConfigError, match=rf"(?s){pattern}")


STYLES = {"v4": v4_dict, "v5": v5_dict}


# ---------------------------------------------------------------------- Hugging Face config.json
@pytest.mark.parametrize("style", STYLES)
def test_hf_config_fields(style):
    d = STYLES[style](rope_parameters={"rope_theta": 5e5, "rope_type": "default"}, rms_norm_eps=1e-6)
    c = ModelConfig.from_hf_dict(d)
    assert c == ModelConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_experts=4,
        top_k=2,
        rms_norm_eps=1e-6,
        rope_theta=5e5,
        sliding_window=None,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        checkpoint_format="hf",
    )
    assert c.q_size == 32 and c.kv_size == 16


@pytest.mark.parametrize("style", STYLES)
def test_from_dir_reads_config_written_by_transformers(tmp_path, style):
    tc = transformers.MixtralConfig(**SMALL, sliding_window=64)
    if style == "v5":
        tc.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        assert "rope_parameters" in written
    else:
        (tmp_path / "config.json").write_text(json.dumps(v4_dict(sliding_window=64)))
    c = ModelConfig.from_dir(tmp_path)
    assert (c.hidden_size, c.intermediate_size, c.num_layers) == (tc.hidden_size, tc.intermediate_size, 2)
    assert (c.num_heads, c.num_kv_heads, c.num_experts, c.top_k) == (4, 2, 4, 2)
    assert c.rope_theta == tc.rope_parameters["rope_theta"] == 1e6
    assert c.sliding_window == 64
    assert c.max_position_embeddings == tc.max_position_embeddings
    assert c.rms_norm_eps == tc.rms_norm_eps
    assert c.checkpoint_format == "hf"


@pytest.mark.parametrize("style", STYLES)
def test_head_dim_absent_null_or_set(style):
    absent = STYLES[style]()
    absent.pop("head_dim", None)
    assert ModelConfig.from_hf_dict(absent).head_dim == 8
    null = STYLES[style]()
    null["head_dim"] = None
    assert ModelConfig.from_hf_dict(null).head_dim == 8
    c = ModelConfig.from_hf_dict(STYLES[style](head_dim=16))  # != hidden / heads
    assert c.head_dim == 16 and c.q_size == 64 and c.kv_size == 32
    assert transformers.MixtralConfig(**SMALL, head_dim=16).head_dim == 16


def test_head_dim_set_allows_hidden_not_divisible_by_heads():
    c = ModelConfig.from_hf_dict(v5_dict(hidden_size=30, head_dim=8))
    assert (c.hidden_size, c.head_dim, c.q_size) == (30, 8, 32)


@pytest.mark.parametrize("window", [None, 4096, 1])
@pytest.mark.parametrize("style", STYLES)
def test_sliding_window(style, window):
    assert ModelConfig.from_hf_dict(STYLES[style](sliding_window=window)).sliding_window == window


@pytest.mark.parametrize(
    ("experts", "top_k"), [(e, k) for e in (1, 2, 3, 8, 16) for k in range(1, e + 1) if e < 16 or k in (1, 2, 16)]
)
def test_experts_and_top_k(experts, top_k):
    c = ModelConfig.from_hf_dict(v5_dict(num_local_experts=experts, num_experts_per_tok=top_k))
    assert (c.num_experts, c.top_k) == (experts, top_k)


@pytest.mark.parametrize("tie", [False, True])
def test_tie_word_embeddings(tie):
    c = ModelConfig.from_hf_dict(v5_dict(tie_word_embeddings=tie))
    assert c.tie_word_embeddings is tie
    # SMALL by hand: embeddings 256*32, final norm 32, and per layer q/o 32*32 each, k/v 32*16 each, two norms of 32
    # and a 4x32 router; an untied lm_head adds another 256*32.
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 2 * 32 + 4 * 32
    tied = 256 * 32 + 32 + 2 * per_layer
    assert c.non_expert_param_count() == (tied if tie else tied + 256 * 32)


def test_optional_fields_default_like_transformers():
    d = v4_dict()
    for k in ("num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "sliding_window"):
        d.pop(k)
    d["num_attention_heads"] = 16
    c = ModelConfig.from_hf_dict(d)
    ref = transformers.MixtralConfig(**d)
    # transformers: num_key_value_heads is 8 when absent ...
    assert c.num_kv_heads == ref.num_key_value_heads == 8
    assert c.rms_norm_eps == ref.rms_norm_eps
    assert c.rope_theta == ref.rope_parameters["rope_theta"]
    assert c.tie_word_embeddings is False and c.sliding_window is None
    # ... and "same as num_attention_heads" when null.
    d = v5_dict(num_attention_heads=16)
    d["num_key_value_heads"] = None
    assert ModelConfig.from_hf_dict(d).num_kv_heads == 16


def test_eos_token_id_list_and_null():
    d = v5_dict(eos_token_id=[2, 32000])
    assert ModelConfig.from_hf_dict(d).eos_token_id == 2
    d = v5_dict(bos_token_id=None, eos_token_id=None)
    c = ModelConfig.from_hf_dict(d)
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)


def test_rope_parameters_without_theta_uses_top_level():
    d = v4_dict(rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    d["rope_parameters"] = {"rope_type": "default"}
    assert ModelConfig.from_hf_dict(d).rope_theta == 5e5


def test_model_type_may_be_absent():
    d = v5_dict()
    del d["model_type"]
    assert ModelConfig.from_hf_dict(d).num_experts == 4


# ---------------------------------------------------------------------- Mixtral-8x7B, both sources
def test_mixtral_8x7b_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B_HF))
    c = ModelConfig.from_dir(tmp_path)
    assert (c.hidden_size, c.intermediate_size, c.num_layers) == (4096, 14336, 32)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (32, 8, 128)
    assert (c.num_experts, c.top_k, c.vocab_size) == (8, 2, 32000)
    assert (c.rope_theta, c.sliding_window, c.max_position_embeddings, c.rms_norm_eps) == (1e6, None, 32768, 1e-5)
    assert c.q_size == 4096 and c.kv_size == 1024
    total = c.non_expert_param_count() + c.num_layers * c.num_experts * c.expert_param_count()
    assert total == MIXTRAL_8X7B_TOTAL_PARAMS


def test_mixtral_8x7b_params_json(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(MIXTRAL_8X7B_PARAMS))
    c = ModelConfig.from_dir(tmp_path)
    assert c.checkpoint_format == "mistral"
    hf = ModelConfig.from_hf_dict(MIXTRAL_8X7B_HF)
    # Same model: only the format marker differs (params.json has no context length; the default is 32768).
    assert c == ModelConfig(**{**hf.__dict__, "checkpoint_format": "mistral"})
    total = c.non_expert_param_count() + c.num_layers * c.num_experts * c.expert_param_count()
    assert total == MIXTRAL_8X7B_TOTAL_PARAMS


def test_mixtral_8x7b_v5_style_matches_v4():
    v5 = copy.deepcopy(MIXTRAL_8X7B_HF)
    v5["rope_parameters"] = {"rope_theta": v5.pop("rope_theta"), "rope_type": "default"}
    assert ModelConfig.from_hf_dict(v5) == ModelConfig.from_hf_dict(MIXTRAL_8X7B_HF)


def test_params_json_head_dim_absent_and_sliding_window():
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    del d["head_dim"]
    d["sliding_window"] = 4096
    c = ModelConfig.from_mistral_params(d)
    assert c.head_dim == 128 and c.sliding_window == 4096
    d["head_dim"] = 64
    assert ModelConfig.from_mistral_params(d).q_size == 32 * 64


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("head_dim", [None, 16])
def test_param_count_matches_transformers_model(tie, head_dim):
    """non_expert_param_count + experts, against a real (tiny) MixtralForCausalLM."""
    c = ModelConfig.from_hf_dict(v5_dict(tie_word_embeddings=tie, head_dim=head_dim))
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**SMALL, tie_word_embeddings=tie, head_dim=head_dim)
    )
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    n = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are counted once
    assert c.non_expert_param_count() + c.num_layers * c.num_experts * c.expert_param_count() == n


@pytest.mark.parametrize("tie", [False, True])
def test_round_trips(tie):
    c = ModelConfig.from_hf_dict(v5_dict(head_dim=16, sliding_window=128, tie_word_embeddings=tie))
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(c.to_hf_dict()))) == c
    # to_hf_dict is a config transformers accepts as the same model.
    tc = transformers.MixtralConfig(**c.to_hf_dict())
    assert (tc.head_dim, tc.sliding_window, tc.num_local_experts, tc.rope_parameters["rope_theta"]) == (
        16,
        128,
        4,
        1e6,
    )
    if not tie:
        m = ModelConfig.from_mistral_params(json.loads(json.dumps(c.to_mistral_params())))
        assert m == ModelConfig(**{**c.__dict__, "checkpoint_format": "mistral"})


# ---------------------------------------------------------------------- errors: Hugging Face
HF_REQUIRED = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
    "num_experts_per_tok",
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("field", HF_REQUIRED)
def test_missing_required_field(style, field):
    d = STYLES[style]()
    del d[field]
    with raises(field, "missing"):
        ModelConfig.from_hf_dict(d)


INT_FIELDS = HF_REQUIRED + ["num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings"]


@pytest.mark.parametrize("bad", ["32", True, 32.0, [32]], ids=["str", "bool", "float", "list"])
@pytest.mark.parametrize("field", INT_FIELDS)
def test_wrong_type_for_int(field, bad):
    d = v5_dict()
    d[field] = bad
    with raises(field, "integer"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(("field", "bad"), [("rms_norm_eps", "1e-5"), ("rms_norm_eps", True), ("rms_norm_eps", None)])
def test_wrong_type_for_float(field, bad):
    d = v5_dict()
    d[field] = bad
    with raises(field):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("bad", ["1e6", True, float("inf")])
@pytest.mark.parametrize("style", STYLES)
def test_wrong_rope_theta(style, bad):
    d = STYLES[style]()
    if style == "v5":
        d["rope_parameters"]["rope_theta"] = bad
    else:
        d["rope_theta"] = bad
    with raises("rope_theta"):
        ModelConfig.from_hf_dict(d)


def test_wrong_type_for_bool():
    d = v5_dict()
    d["tie_word_embeddings"] = "false"
    with raises("tie_word_embeddings"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "field",
    ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "head_dim"],
)
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive(field, value):
    d = v5_dict()
    d[field] = value
    with raises(field):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("field", ["sliding_window", "rms_norm_eps", "max_position_embeddings"])
def test_zero_is_rejected(field):
    d = v5_dict()
    d[field] = 0
    with raises(field):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("style", STYLES)
def test_hidden_not_divisible_by_heads(style):
    d = STYLES[style](hidden_size=30)
    d.pop("head_dim", None)
    with raises("hidden_size", "num_attention_heads"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(("heads", "kv"), [(4, 3), (6, 4)])
def test_heads_not_divisible_by_kv_heads(heads, kv):
    d = v5_dict(hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv)
    with raises("num_attention_heads", "num_key_value_heads"):
        ModelConfig.from_hf_dict(d)


def test_odd_head_dim():
    d = v5_dict()
    d["head_dim"] = 7
    with raises("head_dim", "even"):
        ModelConfig.from_hf_dict(d)


def test_top_k_greater_than_experts():
    d = v5_dict(num_local_experts=4)
    d["num_experts_per_tok"] = 5
    with raises("num_experts_per_tok", "num_local_experts"):
        ModelConfig.from_hf_dict(d)


def test_top_k_zero():
    d = v5_dict()
    d["num_experts_per_tok"] = 0
    with raises("num_experts_per_tok"):
        ModelConfig.from_hf_dict(d)


SCALED_ROPE = {
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 32768},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "longrope": {"short_factor": [1.0], "long_factor": [1.0]},
}


@pytest.mark.parametrize("rope_type", SCALED_ROPE)
def test_scaled_rope_parameters_rejected(rope_type):
    d = v5_dict()
    d["rope_parameters"] = {"rope_theta": 1e6, "rope_type": rope_type, **SCALED_ROPE[rope_type]}
    with raises("rope_parameters.rope_type", repr(rope_type)):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("key", ["rope_type", "type"])
@pytest.mark.parametrize("rope_type", SCALED_ROPE)
def test_scaled_legacy_rope_scaling_rejected(rope_type, key):
    d = v4_dict()
    d["rope_scaling"] = {key: rope_type, **SCALED_ROPE[rope_type]}
    with raises("rope_scaling", repr(rope_type)):
        ModelConfig.from_hf_dict(d)


def test_scaled_rope_scaling_next_to_default_rope_parameters_rejected():
    d = v5_dict()
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with raises("rope_scaling", "yarn"):
        ModelConfig.from_hf_dict(d)


def test_unscaled_rope_variants_accepted():
    d = v4_dict()
    d["rope_scaling"] = None
    assert ModelConfig.from_hf_dict(d).rope_theta == 1e6
    d["rope_scaling"] = {"rope_type": "default"}
    assert ModelConfig.from_hf_dict(d).rope_theta == 1e6
    d = v5_dict()
    d["rope_parameters"] = {"rope_theta": 2e6, "type": "default"}
    assert ModelConfig.from_hf_dict(d).rope_theta == 2e6


def test_rope_parameters_not_an_object():
    d = v5_dict()
    d["rope_parameters"] = [1e6]
    with raises("rope_parameters"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_hidden_act_not_silu(act):
    with raises("hidden_act", act):
        ModelConfig.from_hf_dict(v5_dict(hidden_act=act))


@pytest.mark.parametrize("model_type", ["mistral", "llama", "qwen2_moe"])
def test_model_type_not_mixtral(model_type):
    d = v5_dict()
    d["model_type"] = model_type
    with raises("model_type", model_type):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("bad", [[1, 2], "config", None])
def test_from_dict_not_an_object(bad):
    with pytest.raises(ConfigError, match="object"):
        ModelConfig.from_hf_dict(bad)
    with pytest.raises(ConfigError, match="object"):
        ModelConfig.from_mistral_params(bad)


def test_error_names_the_source():
    d = v5_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match=r"^/some/where/config\.json: .*'hidden_size'"):
        ModelConfig.from_hf_dict(d, source="/some/where/config.json")


# ---------------------------------------------------------------------- errors: files
@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_invalid_json(tmp_path, name):
    (tmp_path / name).write_text('{"hidden_size": 32,')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / name))}: not valid JSON"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"mixtral"', "42", "null"])
@pytest.mark.parametrize("name", ["config.json", "params.json"])
def test_non_object_json(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / name))}: expected a JSON object"):
        ModelConfig.from_dir(tmp_path)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"config\.json.*params\.json") as e:
        ModelConfig.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_path_not_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        ModelConfig.from_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(ConfigError, match="not a directory"):
        ModelConfig.from_dir(tmp_path / "file")


def test_config_json_preferred_over_params_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v5_dict()))
    (tmp_path / "params.json").write_text(json.dumps(MIXTRAL_8X7B_PARAMS))
    assert ModelConfig.from_dir(tmp_path).checkpoint_format == "hf"


def test_from_dir_error_names_the_file(tmp_path):
    d = v5_dict()
    d["num_local_experts"] = "8"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: .*'num_local_experts'"):
        ModelConfig.from_dir(tmp_path)


# ---------------------------------------------------------------------- errors: Mistral params.json
MISTRAL_REQUIRED = ["dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"]


@pytest.mark.parametrize("field", MISTRAL_REQUIRED)
def test_params_missing_field(field):
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    del d[field]
    with raises(field, "missing"):
        ModelConfig.from_mistral_params(d)


@pytest.mark.parametrize("field", ["num_experts", "num_experts_per_tok"])
def test_params_missing_moe_field(field):
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    del d["moe"][field]
    with raises(field, "moe"):
        ModelConfig.from_mistral_params(d)


@pytest.mark.parametrize("moe", [None, 8, "x"])
def test_params_moe_missing_or_not_an_object(moe):
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    if moe is None:
        del d["moe"]
    else:
        d["moe"] = moe
    with raises("moe"):
        ModelConfig.from_mistral_params(d)


@pytest.mark.parametrize("bad", ["4096", True, 4096.0])
@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size"])
def test_params_wrong_type(field, bad):
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    d[field] = bad
    with raises(field, "integer"):
        ModelConfig.from_mistral_params(d)


@pytest.mark.parametrize(("field", "bad"), [("norm_eps", "1e-5"), ("rope_theta", False)])
def test_params_wrong_float(field, bad):
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    d[field] = bad
    with raises(field):
        ModelConfig.from_mistral_params(d)


def test_params_dim_not_divisible_by_heads():
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    del d["head_dim"]
    d["dim"] = 4100
    with raises("dim", "n_heads"):
        ModelConfig.from_mistral_params(d)


def test_params_heads_not_divisible_by_kv_heads():
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    d["n_kv_heads"] = 5
    with raises("n_heads", "n_kv_heads"):
        ModelConfig.from_mistral_params(d)


@pytest.mark.parametrize("top_k", [0, 9])
def test_params_bad_top_k(top_k):
    d = copy.deepcopy(MIXTRAL_8X7B_PARAMS)
    d["moe"]["num_experts_per_tok"] = top_k
    with raises("moe.num_experts_per_tok"):
        ModelConfig.from_mistral_params(d)


def test_direct_construction_is_checked():
    c = ModelConfig.from_hf_dict(v5_dict())
    with raises("num_experts_per_tok"):
        ModelConfig(**{**c.__dict__, "top_k": 5})
