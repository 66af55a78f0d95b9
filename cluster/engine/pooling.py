"""Pooling requests: a prompt in, one vector out (an embedding, or a classifier's label probabilities), computed in
the same engine steps as generation.

A pooling request is prefilled like any prompt (in chunks, batched with other requests' decodes) but never samples:
each step hands back the final hidden states (after the last norm) of the rows it pools (``StepBatch.hidden_rows``),
the request adds them up as its chunks run, and once its last prompt token has run it finishes with
``RequestOutput.pooled`` and gives back its KV blocks.

    pooling   rows pooled
    last      the last prompt token; for ``classify`` the last token that is not the pad token, as transformers'
              MixtralForSequenceClassification picks it
    cls       the first token
    mean      every prompt token, averaged

Embeddings are L2-normalized unless ``normalize=False`` (vLLM's default for causal LMs); class scores go through
softmax (sigmoid for a one-label head) unless ``activation=False``.

Example: prompt [1, 5, 9] pooled by ``mean`` over two chunks [1, 5] and [9]: the first step adds h0 + h1, the second
h2, and the embedding is (h0 + h1 + h2) / 3, L2-normalized.

Shapes: P rows pooled in a step, D hidden, C labels.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cluster.engine.param_values import is_truncation, truncated
from cluster.errors import SamplingParamsError

PoolingTask = Literal["embed", "classify"]
PoolingType = Literal["last", "mean", "cls"]
POOLING_TYPES: tuple[str, ...] = typing.get_args(PoolingType)


@dataclass(frozen=True)
class PoolingParams:
    """What a pooling request returns.

    task                    ``embed`` (the pooled hidden state) or ``classify`` (the score head's label scores)
    pooling                 which prompt rows are pooled: ``last``, ``mean`` or ``cls`` (first)
    normalize               embed: L2-normalize the embedding
    activation              classify: softmax over the labels (sigmoid for one label); False gives raw logits
    truncate_prompt_tokens  None, or keep only the last k prompt tokens (-1: the model's context length)
    """

    task: PoolingTask = "embed"
    pooling: PoolingType = "last"
    normalize: bool = True
    activation: bool = True
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task not in ("embed", "classify"):
            raise SamplingParamsError(param="task", message=f"task must be 'embed' or 'classify', got {self.task!r}")
        if self.pooling not in POOLING_TYPES:
            raise SamplingParamsError(
                param="pooling", message=f"pooling must be one of {', '.join(POOLING_TYPES)}, got {self.pooling!r}"
            )
        for name in ("normalize", "activation"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(param=name, message=f"{name} must be true or false")
        if not is_truncation(self.truncate_prompt_tokens):
            raise SamplingParamsError(
                param="truncate_prompt_tokens",
                message="truncate_prompt_tokens must be -1 (the context length) or an integer >= 1",
            )

    def truncated(self, prompt: list[int], max_model_len: int) -> list[int]:
        """The prompt as the request runs it: its last ``truncate_prompt_tokens`` tokens (-1: ``max_model_len``)."""
        return truncated(prompt, self.truncate_prompt_tokens, max_model_len)


def pooled_span(params: PoolingParams, prompt: list[int], pad_token_id: int | None) -> tuple[int, int]:
    """The prompt positions ``[lo, hi)`` a request pools.

    >>> pooled_span(PoolingParams(task="classify"), [1, 7, 0, 0], pad_token_id=0)
    (1, 2)
    >>> pooled_span(PoolingParams(pooling="mean"), [1, 7, 0, 0], pad_token_id=0)
    (0, 4)
    """
    if params.pooling == "mean":
        return 0, len(prompt)
    if params.pooling == "cls":
        return 0, 1
    last = len(prompt) - 1
    if params.task == "classify" and pad_token_id is not None:
        # transformers: argmax of index * (id != pad), so a prompt of pad tokens only pools position 0
        last = max((i for i, t in enumerate(prompt) if t != pad_token_id), default=0)
    return last, last + 1


class PoolState:
    """One pooling request's running sums over the rows it pools (a preempted request recomputes its prompt from
    the start; rows it already added are not asked for again)."""

    def __init__(self, params: PoolingParams, prompt: list[int], pad_token_id: int | None) -> None:
        self.params = params
        self.lo, self.hi = pooled_span(params, prompt, pad_token_id)
        self.prompt_len = len(prompt)
        self.done = self.lo  # positions below this are added
        self.hidden: torch.Tensor | None = None  # [D] float32 sum
        self.scores: torch.Tensor | None = None  # [C] float32 sum (a classifier)

    @property
    def needs_every_position(self) -> bool:
        """It pools a position other than the last prompt token, which a prefix-cache hit would skip."""
        return self.lo < self.prompt_len - 1

    def positions(self, start: int, n: int) -> range:
        """Positions of a chunk ``[start, start + n)`` to pool now."""
        return range(max(start, self.done), min(start + n, self.hi))

    def add(self, hidden: torch.Tensor, scores: torch.Tensor | None) -> None:
        """hidden [P, D] and scores [P, C] (or None) of the positions :meth:`positions` gave, in order."""
        self.done += int(hidden.shape[0])
        h = hidden.sum(0).cpu()
        self.hidden = h if self.hidden is None else self.hidden + h
        if scores is not None:
            s = scores.sum(0).cpu()
            self.scores = s if self.scores is None else self.scores + s

    def result(self) -> torch.Tensor:
        """The embedding [D] (task embed) or the label scores [C] (task classify), float32."""
        count = self.hi - self.lo
        assert self.done == self.hi and self.hidden is not None, "pooled before every row was added"
        if self.params.task == "embed":
            v = self.hidden / count
            return F.normalize(v, dim=0) if self.params.normalize else v
        assert self.scores is not None, "classify needs a score head"
        logits = self.scores / count
        if not self.params.activation:
            return logits
        return torch.sigmoid(logits) if logits.numel() == 1 else torch.softmax(logits, dim=0)
