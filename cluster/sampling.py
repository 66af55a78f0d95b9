"""Sampling parameters and per-request samplers (greedy, temperature, top-k, top-p, seeded).

Each request owns its own ``torch.Generator``, so a seeded request draws the same tokens whatever else shares its
batch. Temperature 0 is greedy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cluster.errors import SamplingParamsError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    max_tokens      new tokens at most (>= 1)
    temperature     0 is greedy; otherwise logits are divided by it (0 <= t <= 100)
    top_p           nucleus: keep the smallest set of tokens whose probability reaches top_p (0 < p <= 1)
    top_k           keep the k most likely tokens; 0 or -1 keeps all
    seed            makes sampling reproducible; None draws a fresh seed
    stop            strings that end generation; the stop string itself is not returned
    stop_token_ids  token ids that end generation (finish_reason "stop")
    ignore_eos      keep going past EOS
    logprobs        None, or how many top alternatives (0..20) to report with each token's log-probability
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise SamplingParamsError(param="stop", message="stop must be a string or a list of strings")
        if any(s == "" for s in stop):
            raise SamplingParamsError(param="stop", message="stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids if self.stop_token_ids is not None else ()
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise SamplingParamsError(param="stop_token_ids", message="stop_token_ids must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingParamsError(
                param="max_tokens", message=f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not _is_num(self.temperature) or not 0 <= self.temperature <= 100:
            raise SamplingParamsError(
                param="temperature", message=f"temperature must be a number in [0, 100], got {self.temperature!r}"
            )
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingParamsError(param="top_p", message=f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)):
            raise SamplingParamsError(
                param="top_k", message=f"top_k must be -1, 0 (all tokens) or >= 1, got {self.top_k!r}"
            )
        # torch.Generator.manual_seed takes [-2**63, 2**64); outside it add_request would fail with a bare ValueError.
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise SamplingParamsError(
                param="seed", message=f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError(param="ignore_eos", message="ignore_eos must be true or false")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingParamsError(
                param="logprobs", message=f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (token id -> log-probability)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class RequestSampler:
    """Picks the next token of one request from its float32 logits row [V]."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(self.seed)

    def sample(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits).item())
        scores = logits.float().cpu() / p.temperature
        V = scores.shape[-1]
        if p.top_k > 0 and p.top_k < V:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
            drop_sorted = before >= p.top_p
            drop_sorted[0] = False
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def logprobs_of(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """Log-probabilities under the model's distribution (before temperature and truncation)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        values, ids = torch.topk(lp, top_n)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token_id, logprob=float(lp[token_id].item()), top=top)
