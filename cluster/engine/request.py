"""A request's state inside the engine (:class:`Request`) and what the engine reports of it (:class:`RequestOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.engine.sampling import SamplingParams, TokenLogprob, TokenMatcher, new_generator
from cluster.errors import MixserveError
from cluster.text.detokenizer import IncrementalDetokenizer
from cluster.text.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative ``token_ids``/``text`` and what this step added.

    ``error`` is set when the request ended on an error: with ``finish_reason == "error"``, an
    ``ExpertWorkerError`` when a worker failed or an ``InternalError`` (carrying the request id) when the step failed
    for any other reason; with ``finish_reason == "abort"``, ``EngineStoppedError`` when the engine shut down.
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


class Request:
    """One request as the scheduler and the engine core see it."""

    def __init__(
        self, request_id: str, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer, arrival: float
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.generator = new_generator(params)  # the request's own random stream (None when greedy)
        self.matcher: TokenMatcher | None = None  # grammar state under structured output
        self.detok = IncrementalDetokenizer(tokenizer)
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
        self.text = ""  # generated text, stop strings cut off
        self.emitted = 0  # characters of ``text`` already handed out
        self.finish_reason: FinishReason | None = None
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        """More than the newest token is missing from the KV cache: a prompt, or a preempted request's tokens."""
        return len(self.prompt) + len(self.output) - self.computed > 1
