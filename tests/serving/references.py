"""transformers references for the pooling and routed-experts serving tests: the served checkpoints loaded by
transformers itself (float32), their hidden states, label scores and router top-k."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@functools.cache
def hf_causal(folder: Path):
    from transformers import MixtralForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MixtralForCausalLM.from_pretrained(folder).float().eval()


def hf_embedding(model, ids: list[int], pooling: str = "last", normalize: bool = True) -> torch.Tensor:
    """``MixtralModel``'s last hidden state (after the final norm) pooled as the engine pools it."""
    base = model.model  # MixtralModel, of a causal LM or of a sequence classifier
    with torch.no_grad():
        h = base(torch.tensor([ids])).last_hidden_state[0].float()
    v = {"last": h[-1], "mean": h.mean(0), "cls": h[0]}[pooling]
    return F.normalize(v, dim=0) if normalize else v


def hf_class_scores(model, ids: list[int]) -> torch.Tensor:
    """MixtralForSequenceClassification's probabilities: softmax over the labels, sigmoid for one."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.sigmoid(logits) if logits.numel() == 1 else torch.softmax(logits, dim=-1)


def hf_routed(model, ids: list[int]) -> np.ndarray:
    """[T, L, K]: transformers' top-k experts per token and layer (softmax over the router logits, top k)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
    k = model.config.num_experts_per_tok
    return np.stack([torch.softmax(x.float(), -1).topk(k, -1).indices.numpy() for x in logits], axis=1)


def max_diff(got, want: torch.Tensor) -> float:
    return (torch.tensor(np.array(got, dtype=np.float32)) - want).abs().max().item()
