"""Which tensors a process loads (:class:`LoadRole`) and every tensor a Hugging Face Mixtral checkpoint of a config
holds (:func:`expected_shapes`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cluster.config.model import ModelConfig


@dataclass(frozen=True)
class LoadRole:
    """Which tensors a process loads.

    ``non_expert=True`` takes embeddings, attention, norms, gates and lm_head (or a classifier's score head).
    ``experts`` is a set of ``(layer, expert)`` pairs whose w1/w2/w3 are taken. Everything else is skipped on
    purpose.
    """

    non_expert: bool = False
    experts: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @classmethod
    def frontend(cls) -> LoadRole:
        return cls(non_expert=True)

    @classmethod
    def expert_shard(cls, experts: Iterable[tuple[int, int]]) -> LoadRole:
        return cls(non_expert=False, experts=frozenset(experts))

    @classmethod
    def everything(cls, config: ModelConfig) -> LoadRole:
        pairs = {(i, e) for i in range(config.num_layers) for e in range(config.num_experts)}
        return cls(non_expert=True, experts=frozenset(pairs))


EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Mixtral checkpoint of this config holds, with its shape."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not config.can_generate:  # MixtralForSequenceClassification: a score head instead of lm_head
        shapes["score.weight"] = (config.num_labels, d)
    elif not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (config.q_size, d)
        shapes[p + "self_attn.k_proj.weight"] = (config.kv_size, d)
        shapes[p + "self_attn.v_proj.weight"] = (config.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, config.q_size)
        shapes[p + "block_sparse_moe.gate.weight"] = (config.num_experts, d)
        for e in range(config.num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (f, d)
            shapes[q + "w2.weight"] = (d, f)
            shapes[q + "w3.weight"] = (f, d)
    return shapes


def role_wants(role: LoadRole, hf_name: str) -> bool:
    m = EXPERT_RE.match(hf_name)
    if m:
        return (int(m.group(1)), int(m.group(2))) in role.experts
    return role.non_expert


_LINEAR_RE = re.compile(
    r"^(lm_head|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|block_sparse_moe\.(gate|experts\.\d+\.w[123])))\.weight$"
)


def is_linear(hf_name: str) -> bool:
    """Whether a tensor is the weight of a linear module (what a quantization scheme may quantize)."""
    return _LINEAR_RE.match(hf_name) is not None
