"""Model configuration, read from a checkpoint's own JSON.

Two sources describe the same model:

- Hugging Face ``config.json`` (``MixtralForCausalLM``), in transformers v4 style (``rope_theta`` at the top
  level) or v5 style (``rope_parameters: {"rope_theta": ..., "rope_type": "default"}``);
- the original Mistral release's ``params.json`` (``dim``, ``n_layers``, ``moe: {...}`` ...).

Both become one frozen :class:`ModelConfig`. Every value is type-checked and cross-checked; a bad value raises
:class:`ConfigError` naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from cluster.config.json_fields import FieldReader, read_json, require_object
from cluster.config.quantization import QuantizationConfig
from cluster.errors import ConfigError

CheckpointFormat = Literal["hf", "mistral"]
# What the checkpoint's head is: MixtralForCausalLM's lm_head (next-token logits) or
# MixtralForSequenceClassification's score head (num_labels logits of the last non-pad token).
Architecture = Literal["causal_lm", "sequence_classification"]
ARCHITECTURES: dict[str, Architecture] = {
    "MixtralForCausalLM": "causal_lm",
    "MixtralForSequenceClassification": "sequence_classification",
}

# Mixtral-8x7B's own context length; the original params.json does not state one.
MISTRAL_DEFAULT_MAX_POSITIONS = 32768


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Mixtral-style sparse MoE decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    checkpoint_format: CheckpointFormat = "hf"
    quantization: QuantizationConfig | None = None  # config.json's quantization_config (cluster.config.quantization)
    architecture: Architecture = "causal_lm"
    id2label: tuple[str, ...] = ()  # sequence classification: label i's name (num_labels of them)
    pad_token_id: int | None = None  # sequence classification pools the last token that is not this one

    def __post_init__(self) -> None:
        _check_consistency(self, source="ModelConfig", names=_HF_NAMES)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def can_generate(self) -> bool:
        """Whether the checkpoint has an lm_head (a classifier has a score head instead)."""
        return self.architecture == "causal_lm"

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (Hugging Face) or, failing that, ``params.json`` (original Mistral release)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"model path {str(folder)!r} is not a directory")
        hf = folder / "config.json"
        if hf.is_file():
            return cls.from_hf_dict(read_json(hf), source=str(hf))
        params = folder / "params.json"
        if params.is_file():
            return cls.from_mistral_params(read_json(params), source=str(params))
        raise ConfigError(f"{folder}: no config.json (Hugging Face) or params.json (Mistral) found")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from a transformers ``MixtralConfig`` dict (v4 or v5 style)."""
        require_object(d, source)
        r = FieldReader(d, source)
        model_type = d.get("model_type")
        if model_type is not None and model_type != "mixtral":
            raise ConfigError(f"{source}: model_type is {model_type!r}; only 'mixtral' is supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Mixtral uses 'silu')")
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        head_dim = r.int("head_dim", optional=True)
        if head_dim is None:
            if heads <= 0 or hidden % heads:
                raise ConfigError(
                    f"{source}: hidden_size ({hidden}) must be divisible by num_attention_heads ({heads}) "
                    "when head_dim is not set"
                )
            head_dim = hidden // heads
        q = d.get("quantization_config")
        architecture, id2label = _hf_head(d, source)
        return _validated(
            cls,
            source,
            _HF_NAMES,
            vocab_size=r.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.int("intermediate_size"),
            num_layers=r.int("num_hidden_layers"),
            num_heads=heads,
            # As transformers' MixtralConfig: 8 when absent, "same as num_attention_heads" (MHA) when null.
            num_kv_heads=_hf_kv_heads(r, heads),
            head_dim=head_dim,
            num_experts=r.int("num_local_experts"),
            top_k=r.int("num_experts_per_tok"),
            rms_norm_eps=r.float("rms_norm_eps", default=1e-5),
            rope_theta=_hf_rope_theta(d, source),
            sliding_window=r.int("sliding_window", optional=True),
            max_position_embeddings=r.int("max_position_embeddings", default=32768),
            tie_word_embeddings=r.bool("tie_word_embeddings", default=False),
            bos_token_id=r.int("bos_token_id", default=1, allow_null_default=True),
            eos_token_id=_eos_id(d, source),
            checkpoint_format="hf",
            quantization=None if q is None else QuantizationConfig.from_dict(q, source=source),
            architecture=architecture,
            id2label=id2label,
            pad_token_id=r.int("pad_token_id", optional=True),
        )

    @classmethod
    def from_mistral_params(cls, d: dict[str, Any], *, source: str = "params.json") -> ModelConfig:
        """Build from the original Mistral release's ``params.json``."""
        require_object(d, source)
        r = FieldReader(d, source)
        moe = d.get("moe")
        if not isinstance(moe, dict):
            raise ConfigError(f"{source}: field 'moe' must be an object with num_experts and num_experts_per_tok")
        m = FieldReader(moe, f"{source} (moe)")
        dim = r.int("dim")
        heads = r.int("n_heads")
        head_dim = r.int("head_dim", optional=True)
        if head_dim is None:
            if heads <= 0 or dim % heads:
                raise ConfigError(f"{source}: dim ({dim}) must be divisible by n_heads ({heads})")
            head_dim = dim // heads
        return _validated(
            cls,
            source,
            _MISTRAL_NAMES,
            vocab_size=r.int("vocab_size"),
            hidden_size=dim,
            intermediate_size=r.int("hidden_dim"),
            num_layers=r.int("n_layers"),
            num_heads=heads,
            num_kv_heads=r.int("n_kv_heads", default=heads),
            head_dim=head_dim,
            num_experts=m.int("num_experts"),
            top_k=m.int("num_experts_per_tok"),
            rms_norm_eps=r.float("norm_eps", default=1e-5),
            rope_theta=r.float("rope_theta", default=1e6),
            sliding_window=r.int("sliding_window", optional=True),
            max_position_embeddings=r.int("max_seq_len", default=MISTRAL_DEFAULT_MAX_POSITIONS),
            tie_word_embeddings=False,
            checkpoint_format="mistral",
        )

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def expert_param_count(self) -> int:
        """Parameters of one expert (w1, w2, w3)."""
        return 3 * self.hidden_size * self.intermediate_size

    def non_expert_param_count(self) -> int:
        d = self.hidden_size
        per_layer = d * self.q_size * 2 + d * self.kv_size * 2 + 2 * d + self.num_experts * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + d + self.num_layers * per_layer

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers v5 ``config.json`` for this architecture."""
        head = {v: k for k, v in ARCHITECTURES.items()}[self.architecture]
        labels = {"id2label": dict(enumerate(self.id2label))} if self.id2label else {}
        return {
            "architectures": [head],
            **labels,
            "pad_token_id": self.pad_token_id,
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }

    def to_mistral_params(self) -> dict[str, Any]:
        """The original release's ``params.json`` for this architecture."""
        return {
            "dim": self.hidden_size,
            "n_layers": self.num_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.intermediate_size,
            "n_heads": self.num_heads,
            "n_kv_heads": self.num_kv_heads,
            "norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_seq_len": self.max_position_embeddings,
            "moe": {"num_experts": self.num_experts, "num_experts_per_tok": self.top_k},
        }


def _hf_rope_theta(d: dict[str, Any], source: str) -> float:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    # A legacy rope_scaling is checked even next to rope_parameters: a scaled RoPE is never silently ignored.
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise ConfigError(f"{source}: rope_scaling {kind!r} is not supported; only unscaled RoPE is")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{source}: rope_parameters.rope_type {rope_type!r} (RoPE scaling) is not supported; only 'default' is"
            )
        if "rope_theta" not in params and d.get("rope_theta") is not None:
            return FieldReader(d, source).float("rope_theta")
        return FieldReader(params, f"{source} (rope_parameters)").float("rope_theta", default=1e6)
    return FieldReader(d, source).float("rope_theta", default=1e6)


def _hf_head(d: dict[str, Any], source: str) -> tuple[Architecture, tuple[str, ...]]:
    """(architecture, label names) from ``architectures`` and ``id2label`` (or ``num_labels``, as transformers'
    PretrainedConfig: labels ``LABEL_0`` .. when only a count is given; 2 when neither is)."""
    names = d.get("architectures") or ["MixtralForCausalLM"]
    if not isinstance(names, list) or len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: architectures is {names!r}; one of {', '.join(map(repr, ARCHITECTURES))} is supported"
        )
    architecture = ARCHITECTURES[names[0]]
    if architecture != "sequence_classification":
        return architecture, ()
    raw = d.get("id2label")
    if raw is None:
        count = FieldReader(d, source).int("num_labels", default=2)
        if count <= 0:
            raise ConfigError(f"{source}: field 'num_labels' must be positive, got {count}")
        return architecture, tuple(f"LABEL_{i}" for i in range(count))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: field 'id2label' must be a non-empty object of label index -> name")
    try:
        labels = {int(k): v for k, v in raw.items()}
    except ValueError:
        raise ConfigError(f'{source}: id2label keys must be label indices ("0", "1", ...)') from None
    if sorted(labels) != list(range(len(labels))) or not all(isinstance(v, str) for v in labels.values()):
        raise ConfigError(f"{source}: id2label must name labels 0 .. {len(labels) - 1} with strings")
    return architecture, tuple(labels[i] for i in range(len(labels)))


def _hf_kv_heads(r: FieldReader, heads: int) -> int:
    if "num_key_value_heads" not in r.d:
        return 8
    return r.int("num_key_value_heads", default=heads, allow_null_default=True)


def _eos_id(d: dict[str, Any], source: str) -> int:
    v = d.get("eos_token_id", 2)
    if v is None:
        return 2
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{source}: field 'eos_token_id' must be an integer, got {v!r}")
    return v


# Attribute -> the field name users see in each file format.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_experts": "num_local_experts",
    "top_k": "num_experts_per_tok",
    "max_position_embeddings": "max_position_embeddings",
    "sliding_window": "sliding_window",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
}
_MISTRAL_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "intermediate_size": "hidden_dim",
    "num_layers": "n_layers",
    "num_heads": "n_heads",
    "num_kv_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "num_experts": "moe.num_experts",
    "top_k": "moe.num_experts_per_tok",
    "max_position_embeddings": "max_seq_len",
    "sliding_window": "sliding_window",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
}


def _validated(cls: type[ModelConfig], source: str, names: dict[str, str], **kw: Any) -> ModelConfig:
    _check_consistency(SimpleNamespace(**kw), source=source, names=names)
    return cls(**kw)


def _check_consistency(c: Any, *, source: str, names: dict[str, str]) -> None:
    n = names
    for attr in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "num_experts",
        "top_k",
        "max_position_embeddings",
    ):
        value = getattr(c, attr)
        if value <= 0:
            raise ConfigError(f"{source}: field {n[attr]!r} must be positive, got {value}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(
            f"{source}: {n['num_heads']} ({c.num_heads}) must be divisible by {n['num_kv_heads']} ({c.num_kv_heads})"
        )
    if c.head_dim % 2:
        raise ConfigError(f"{source}: {n['head_dim']} ({c.head_dim}) must be even for RoPE")
    if c.top_k > c.num_experts:
        raise ConfigError(f"{source}: {n['top_k']} ({c.top_k}) must not exceed {n['num_experts']} ({c.num_experts})")
    if c.sliding_window is not None and c.sliding_window <= 0:
        raise ConfigError(f"{source}: field 'sliding_window' must be positive or null, got {c.sliding_window}")
    if c.rms_norm_eps <= 0:
        raise ConfigError(f"{source}: field {n['rms_norm_eps']!r} must be positive")
    if c.rope_theta <= 0:
        raise ConfigError(f"{source}: field {n['rope_theta']!r} must be positive")
