"""A request's state inside the engine (:class:`Request`) and what the engine reports of it (:class:`RequestOutput`,
with vLLM's :class:`CompletionOutput` per choice and :class:`Logprob` entries where the offline API fills them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cluster.engine.pooling import PoolingParams, PoolState
from cluster.engine.routed import RoutedExperts
from cluster.engine.sampling import SamplingParams, TokenLogprob, TokenMatcher, new_generator
from cluster.errors import MixserveError
from cluster.text.detokenizer import IncrementalDetokenizer
from cluster.text.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class Logprob:
    """vLLM's ``Logprob``: a token's log-probability, its rank among all tokens (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One choice of a prompt, as vLLM's ``CompletionOutput``: ``logprobs`` holds per generated token a dict token
    id -> :class:`Logprob` (the chosen token and the top alternatives); ``cumulative_logprob`` their sum when
    logprobs were asked for (else None); ``stop_reason`` the stop string or stop token id that ended it (None for
    EOS or a length cut)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routed_experts: np.ndarray | None = None  # [tokens, layers, top_k] with return_routed_experts

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative ``token_ids``/``text`` and what this step added.

    ``error`` is set when the request ended on an error: with ``finish_reason == "error"``, an
    ``ExpertWorkerError`` when a worker failed or an ``InternalError`` (carrying the request id) when the step failed
    for any other reason; with ``finish_reason == "abort"``, ``EngineStoppedError`` when the engine shut down.

    The offline API (``LLM.generate`` / ``LLM.chat``) returns one per prompt in vLLM's shape: ``prompt`` (its text;
    None for token ids) and ``outputs``, its n :class:`CompletionOutput` s; the fields above then repeat
    ``outputs[0]``, the first (or best) choice. The engine's own outputs leave ``outputs`` empty.

    A finished output of a request that asked for ``return_routed_experts`` has ``routed_experts``, [N, L, K] int16
    (``cluster.engine.routed``); a pooling request's (``cluster.engine.pooling``) has ``pooled``, its embedding [D]
    or label scores [C], float32, and no tokens.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs; None for token 0
    error: MixserveError | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    prompt: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int | None = None
    routed_experts: np.ndarray | None = None
    pooled: torch.Tensor | None = None


Params = SamplingParams | PoolingParams  # a generation or a pooling request


class Request:
    """One request as the scheduler and the engine core see it (a pooling request carries default sampling params
    it never samples with)."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        arrival: float,
        *,
        pool: PoolState | None = None,
        routed: bool = False,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.pool = pool  # a pooling request's sums (it never samples)
        self.routed = RoutedExperts() if routed else None  # with return_routed_experts
        self.cached_blocks: list[int] = []  # the blocks its prefix was found in (at its last admission)
        self.generator = new_generator(params)  # the request's own random stream (None when greedy)
        self.matcher: TokenMatcher | None = None  # grammar state under structured output
        self.detok = IncrementalDetokenizer(
            tokenizer,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        self.bad_words = bad_word_ids(tokenizer, params.bad_words)
        self.salt = params.cache_salt.encode() if params.cache_salt is not None else b""  # prefix-cache chain seed
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] = []  # of prompt tokens 1.. (with params.prompt_logprobs)
        self.computed = 0  # tokens already in the KV cache
        self.blocks: list[int] = []  # block table (cluster.engine.step.SeqChunk.blocks), owned by the scheduler
        self.hashes: list[bytes] = []  # prefix-cache hash chain of the full blocks registered so far
        self.prompt_hashes: list[bytes] = []  # hash chain of every full block it has to compute (set at admission)
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.scheduled: float | None = None  # when it first got into a step
        self.steps = 0  # steps it has run
        self.text = ""  # generated text, stop strings cut off (kept with include_stop_str_in_output)
        self.emitted = 0  # characters of ``text`` already handed out
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.max_stop = max((len(s) for s in params.stop), default=0)
        # characters held back because they could still turn into a stop string (none when it is kept anyway)
        self.holdback = 0 if params.include_stop_str_in_output else max(self.max_stop - 1, 0)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def full_prompt(self) -> bool:
        """Every prompt position must run (no prefix-cache lookup): its prompt is scored, or pooled at a position
        other than the last."""
        return self.params.prompt_logprobs is not None or (self.pool is not None and self.pool.needs_every_position)

    @property
    def prefilling(self) -> bool:
        """More than the newest token is missing from the KV cache: a prompt, or a preempted request's tokens."""
        return len(self.prompt) + len(self.output) - self.computed > 1

    def cut_stop_string(self) -> bool:
        """End the text at the first stop string in it (after it with include_stop_str_in_output): whether one
        was found (then ``stop_reason`` is that string)."""
        if not self.params.stop:
            return False
        search_from = max(0, self.emitted - self.max_stop)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[: at + len(stop) if self.params.include_stop_str_in_output else at]
        self.stop_reason = stop
        return True


def bad_word_ids(tokenizer: Tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word as token sequences, as vLLM tokenizes them: the word without its leading blanks, and with one
    leading space when that is a different first token of the same length (a word in the middle of the text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), bos=False))
        if not plain:
            continue
        out.append(plain)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), bos=False))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return tuple(out)
