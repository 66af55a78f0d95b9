"""Sampling parameters and the batched sampler (penalties, logit bias, min_tokens, greedy, temperature, min_p,
top-k, top-p, seeded draws).

Each request owns its own ``torch.Generator``, so a seeded request draws the same tokens whatever else shares its
batch. Temperatures below 1e-5 are greedy.
"""

from __future__ import annotations

import secrets
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from cluster.engine.param_values import (
    allowed_ids,
    bias_pairs,
    in_range,
    int_in,
    is_int,
    is_num,
    is_truncation,
    stop_strings,
    truncated,
    word_list,
)
from cluster.errors import SamplingParamsError

MAX_LOGPROBS = 20
MAX_CHOICES = 128  # n and best_of at most (offline, HTTP and gRPC alike; OpenAI's limit for n)
SAMPLING_EPS = 1e-5  # temperatures below this are greedy, as in vLLM


StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
STRUCTURED_KINDS: tuple[str, ...] = typing.get_args(StructuredKind)


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain the output to a grammar: ``kind`` says how to read ``spec``.

    json_schema  spec is a JSON schema (as a JSON string); the output is a JSON value that validates against it
    json_object  any JSON object (spec is ignored)
    regex        spec is a regular expression the whole output matches
    choice       spec is a JSON list of strings; the output is exactly one of them
    lark         spec is a Lark grammar
    """

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise SamplingParamsError(
                param="response_format", message=f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}"
            )
        if not isinstance(self.spec, str):
            raise SamplingParamsError(param="response_format", message="the structured output spec must be a string")


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
    presence_penalty     subtracted once from the logit of every token already generated (-2 <= p <= 2)
    frequency_penalty    subtracted per occurrence from the logit of every generated token (-2 <= f <= 2)
    repetition_penalty   tokens of the prompt or output: positive logits divided by it, negative multiplied
                         (> 0; 1 leaves logits alone)
    min_p           drop tokens whose probability is below min_p x the top token's (0 <= m <= 1)
    min_tokens      EOS and stop_token_ids cannot end generation before this many tokens (<= max_tokens)
    logit_bias      token id -> bias in [-100, 100] added to its logit before sampling (greedy too)
    n / best_of     n completions per prompt (choice j samples with seed + j); with best_of > n, best_of are
                    generated and the n most likely kept (highest summed logprob). ``cluster.engine.fanout`` expands
                    them into one engine request per candidate (the engine itself runs n = 1 only)
    prompt_logprobs None, or how many top alternatives (0..20) to report with each prompt token's log-probability
                    given the tokens before it (the first token has none; such prompts skip the prefix cache)
    structured_output   None, or a grammar every output token must follow (the engine masks the rest; the
                        request stops when the grammar is complete)
    include_stop_str_in_output   keep the stop string (or a stop token's text) at the end of the text
    skip_special_tokens          leave special tokens out of the text (False: their pieces, ``</s>``)
    spaces_between_special_tokens    with special tokens kept, a space between them and the text around them
    allowed_token_ids   None, or the only token ids that may be sampled (non-empty)
    bad_words       words that may not be generated: the last token of each word's tokens (with and without a
                    leading space) is masked whenever the tokens before it were just generated
    truncate_prompt_tokens  None, or keep only the last k prompt tokens (-1: the model's context length)
    cache_salt      None, or a string mixed into the prefix-cache hashes: only requests with the same salt share
                    cached blocks
    return_routed_experts   report the experts of every layer each token was routed to
                            (``RequestOutput.routed_experts``, ``cluster.engine.routed``)

    Penalties, min_p, logit_bias, allowed_token_ids and bad_words follow vLLM's definitions. A temperature below
    1e-5 is greedy.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    structured_output: StructuredOutput | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: Sequence[int] | None = None  # stored as a tuple
    bad_words: Sequence[str] = ()  # stored as a tuple
    truncate_prompt_tokens: int | None = None
    cache_salt: str | None = None
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", stop_strings(self.stop))
        ids = self.stop_token_ids if self.stop_token_ids is not None else ()
        if not all(is_int(i) and i >= 0 for i in ids):
            raise SamplingParamsError(param="stop_token_ids", message="stop_token_ids must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        for param, ok, want in self._range_checks():  # in order: a later check may rely on an earlier one
            if not ok():
                raise SamplingParamsError(param=param, message=f"{param} must be {want}, got {getattr(self, param)!r}")
        for name in (
            "ignore_eos",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "return_routed_experts",
        ):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(param=name, message=f"{name} must be true or false")
        object.__setattr__(self, "logit_bias", bias_pairs(self.logit_bias))
        object.__setattr__(self, "allowed_token_ids", allowed_ids(self.allowed_token_ids))
        object.__setattr__(self, "bad_words", word_list(self.bad_words))
        if self.cache_salt is not None and not (isinstance(self.cache_salt, str) and self.cache_salt):
            raise SamplingParamsError(param="cache_salt", message="cache_salt must be a non-empty string")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise SamplingParamsError(param="response_format", message="structured_output must be a StructuredOutput")

    def _range_checks(self) -> list[tuple[str, Callable[[], bool], str]]:
        """(parameter, check, what it must be) for every numeric parameter."""
        return [
            ("max_tokens", lambda: is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", lambda: in_range(self.temperature, 0, 100), "a number in [0, 100]"),
            ("top_p", lambda: is_num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", lambda: is_int(self.top_k) and (self.top_k >= 1 or self.top_k in (0, -1)),
             "-1, 0 (all tokens) or >= 1"),
            # torch.Generator.manual_seed takes [-2**63, 2**64); outside it add_request would fail with a ValueError.
            ("seed", lambda: self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**64),
             "an integer in [-2**63, 2**64)"),
            ("logprobs", lambda: self.logprobs is None or int_in(self.logprobs, 0, MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}]"),
            ("presence_penalty", lambda: in_range(self.presence_penalty, -2, 2), "a number in [-2, 2]"),
            ("frequency_penalty", lambda: in_range(self.frequency_penalty, -2, 2), "a number in [-2, 2]"),
            ("repetition_penalty", lambda: is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
             "a number in (0, 10]"),
            ("min_p", lambda: in_range(self.min_p, 0, 1), "a number in [0, 1]"),
            ("min_tokens", lambda: int_in(self.min_tokens, 0, self.max_tokens),
             f"an integer in [0, max_tokens={self.max_tokens}]"),
            ("n", lambda: int_in(self.n, 1, MAX_CHOICES), f"an integer in [1, {MAX_CHOICES}]"),
            ("best_of", lambda: self.best_of is None or int_in(self.best_of, self.n, MAX_CHOICES),
             f"an integer in [n, {MAX_CHOICES}]"),
            ("prompt_logprobs", lambda: self.prompt_logprobs is None or int_in(self.prompt_logprobs, 0, MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}]"),
            ("truncate_prompt_tokens", lambda: is_truncation(self.truncate_prompt_tokens),
             "-1 (the context length) or an integer >= 1"),
        ]  # fmt: skip

    def truncated(self, prompt: list[int], max_model_len: int) -> list[int]:
        """The prompt as the request runs it: its last ``truncate_prompt_tokens`` tokens (-1: ``max_model_len``)."""
        return truncated(prompt, self.truncate_prompt_tokens, max_model_len)

    @property
    def candidates(self) -> int:
        """Engine requests per prompt: ``best_of`` when given, else ``n`` (see ``cluster.engine.fanout``)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy (dividing logits by them overflows)."""
        return self.temperature < SAMPLING_EPS

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as sorted (token id, bias) pairs (what __post_init__ stored)."""
        return typing.cast(tuple[tuple[int, float], ...], self.logit_bias)

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (token id -> log-probability)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None  # of the chosen token among all (1: the most likely)


class TokenMatcher(Protocol):
    """One request's grammar state: which tokens may come next, and moving past the one that came."""

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens the grammar accepts next."""
        ...

    def accept(self, token: int) -> None: ...

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the output may follow."""
        ...


class GrammarCompiler(Protocol):
    """Turns a request's :class:`StructuredOutput` into a matcher; raises ``SamplingParamsError`` for a bad spec."""

    def matcher(self, spec: StructuredOutput) -> TokenMatcher: ...


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """A request's own random stream: seeded when asked, else freshly seeded; None for greedy requests."""
    if params.greedy:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


@dataclass(frozen=True)
class SamplingRow:
    """What the batched sampler needs of one request: its parameters, random stream, tokens so far, under a
    grammar which tokens it allows next (bool [V]), and its bad words as token sequences."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt: Sequence[int]
    output: Sequence[int]
    allowed: torch.Tensor | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], *, eos_token_id: int) -> torch.Tensor:
    """The next token of every row: logits [R, V] float32 -> token ids [R] int64, in a few batched tensor ops;
    -1 for a row whose constraints (grammar, min_tokens, logit_bias) leave no token.

    Per row, in vLLM's order: allowed_token_ids and bad_words, min_tokens (EOS and stop_token_ids masked until
    that many tokens exist), logit_bias,
    repetition / frequency / presence penalties; greedy rows take the argmax of that; the others divide by their
    temperature, drop tokens under min_p x the top probability, keep their top_k and top_p nucleus, and draw with
    their own generator (an exponential race, so a seeded row draws the same token whatever else is in the batch).
    """
    R, V = logits.shape
    x = logits.float().clone()
    _process(x, rows, eos_token_id=eos_token_id)
    out = torch.argmax(x, dim=-1)
    impossible = torch.isneginf(x).all(dim=-1)  # the row's constraints allow no token: -1, the caller fails it
    if bool(impossible.any()):
        x[impossible] = 0.0
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not drawn:
        return out
    idx = torch.tensor(drawn)
    xs = x[idx] / torch.tensor([rows[i].params.temperature for i in drawn])[:, None]  # [S, V]
    probs = torch.softmax(xs, dim=-1)
    min_p = torch.tensor([rows[i].params.min_p for i in drawn])
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_k = torch.tensor([rows[i].params.top_k if rows[i].params.top_k > 0 else V for i in drawn])
    top_p = torch.tensor([rows[i].params.top_p for i in drawn])
    if bool((top_k < V).any() or (top_p < 1).any()):
        sorted_probs, order = torch.sort(probs, descending=True)  # [S, V]
        rank = torch.arange(V)[None, :]
        in_k = rank < top_k[:, None]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
        kept = (sorted_probs * in_k).sum(-1, keepdim=True)  # the nucleus is taken within the top k
        drop = ~in_k | ((before >= top_p[:, None] * kept) & (rank > 0))
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), 0.0)
    race = torch.empty_like(probs)
    for j, i in enumerate(drawn):
        race[j].exponential_(1.0, generator=rows[i].generator)
    out[idx] = torch.argmax(probs / race, dim=-1)
    return out.masked_fill(impossible, -1)


def _process(x: torch.Tensor, rows: Sequence[SamplingRow], *, eos_token_id: int) -> None:
    """Grammar, allowed_token_ids, bad words, min_tokens, logit_bias and penalties applied in place to logits
    x [R, V]."""
    V = x.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        _mask_words(x[i], r, V)
        if r.allowed is not None:
            x[i, : r.allowed.shape[0]].masked_fill_(~r.allowed[:V], float("-inf"))
            x[i, r.allowed.shape[0] :] = float("-inf")
        if len(r.output) < p.min_tokens:
            x[i, [eos_token_id, *(t for t in p.stop_token_ids if t < V)]] = float("-inf")
        bias = p.bias
        if bias:
            x[i, [t for t, _ in bias if t < V]] += torch.tensor([b for t, b in bias if t < V])
    pen = [i for i, r in enumerate(rows) if r.params.penalised]
    if not pen:
        return
    counts = torch.zeros(len(pen), V)  # output token counts
    seen = torch.zeros(len(pen), V, dtype=torch.bool)  # prompt or output
    for j, i in enumerate(pen):
        out = torch.tensor(list(rows[i].output), dtype=torch.int64)
        counts[j].scatter_add_(0, out, torch.ones(len(out)))
        seen[j, torch.tensor(list(rows[i].prompt), dtype=torch.int64)] = True
    seen |= counts > 0
    idx = torch.tensor(pen)
    xp = x[idx]
    rp = torch.tensor([rows[i].params.repetition_penalty for i in pen])[:, None]
    xp = torch.where(seen, torch.where(xp > 0, xp / rp, xp * rp), xp)
    xp -= torch.tensor([rows[i].params.frequency_penalty for i in pen])[:, None] * counts
    xp -= torch.tensor([rows[i].params.presence_penalty for i in pen])[:, None] * (counts > 0)
    x[idx] = xp


def _mask_words(x: torch.Tensor, r: SamplingRow, V: int) -> None:
    """allowed_token_ids (every other token masked) and bad words (a word's last token masked after the tokens
    before it) of one row, in place on its logits [V]."""
    ids = r.params.allowed_token_ids
    if ids is not None:
        keep = torch.full((V,), float("-inf"))
        keep[[t for t in ids if t < V]] = 0.0
        x += keep
    out = list(r.output)
    for word in r.bad_words:
        prefix = list(word[:-1])
        if len(prefix) <= len(out) and out[len(out) - len(prefix) :] == prefix and word[-1] < V:
            x[word[-1]] = float("-inf")


def logprobs_of(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """Log-probabilities under the model's distribution (before temperature and truncation)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        values, ids = torch.topk(lp, top_n)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    rank = int((lp > lp[token_id]).sum().item()) + 1
    return TokenLogprob(token_id=token_id, logprob=float(lp[token_id].item()), top=top, rank=rank)
