"""The two tensor-name layouts of a Mixtral checkpoint: Hugging Face (``model.layers.0.self_attn.q_proj.weight``)
and the original Mistral release (``layers.0.attention.wq.weight``), and the rotary row permutation that turns the
original ``wq``/``wk`` (interleaved rotary pairs) into Hugging Face's (rotate-half), as its conversion script does."""

from __future__ import annotations

import re

import torch

_MISTRAL_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_MISTRAL_TOP["output.weight"] = "lm_head.weight"
_MISTRAL_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_MISTRAL_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_MISTRAL_EXPERT_RE = re.compile(r"^feed_forward\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def mistral_to_hf_name(name: str) -> str | None:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None when unknown."""
    if name in _MISTRAL_TOP:
        return _MISTRAL_TOP[name]
    m = _MISTRAL_LAYER_RE.match(name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    if rest in _MISTRAL_LAYER:
        return f"model.layers.{layer}.{_MISTRAL_LAYER[rest]}"
    e = _MISTRAL_EXPERT_RE.match(rest)
    if e:
        return f"model.layers.{layer}.block_sparse_moe.experts.{e.group(1)}.{e.group(2)}.weight"
    return None


def hf_to_mistral_name(hf_name: str) -> str:
    inverse_top = {v: k for k, v in _MISTRAL_TOP.items()}
    if hf_name in inverse_top:
        return inverse_top[hf_name]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if not m:
        raise KeyError(hf_name)
    layer, rest = m.group(1), m.group(2)
    for mk, hk in _MISTRAL_LAYER.items():
        if rest == hk:
            return f"layers.{layer}.{mk}"
    e = re.match(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$", rest)
    if e:
        return f"layers.{layer}.feed_forward.experts.{e.group(1)}.{e.group(2)}.weight"
    raise KeyError(hf_name)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Original Mistral (interleaved rotary pairs) -> Hugging Face (rotate-half) row order for wq / wk.

    Rows of one head go from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...). Same as the HF conversion
    script's ``permute``.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rotary` (Hugging Face -> original Mistral row order)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
