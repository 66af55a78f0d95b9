"""The synchronous engine: scheduler + executor + sampling + detokenizing, one step at a time.

``add_request`` / ``abort`` / ``step``. Requests join between steps and leave as soon as they finish, so a long
request never holds up a short one. The executor is anything that follows ``cluster.engine.step.Executor``: the model
runner in production, a fake in the scheduler's tests.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch

from cluster.config.engine import EngineConfig
from cluster.engine import intake, offline
from cluster.engine.blocks import BlockPool
from cluster.engine.layout import StepLayout
from cluster.engine.pooling import PoolingParams, PoolState
from cluster.engine.request import Params, Request, RequestOutput
from cluster.engine.sampling import GrammarCompiler, SamplingParams, SamplingRow, TokenLogprob, logprobs_of, sample
from cluster.engine.scheduler import Scheduler
from cluster.engine.step import Executor, SeqChunk
from cluster.errors import (
    InternalError,
    InvalidRequestError,
    MixserveError,
)
from cluster.text.tokenizer import Tokenizer

log = logging.getLogger("mixserve")

COUNTERS = (
    "requests_added",
    "prompt_tokens",
    "generation_tokens",
    "finished_stop",
    "finished_length",
    "finished_abort",
    "finished_error",
    "pooling_requests",
)
POOLING_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)  # what a pooling request carries (never sampled)


class EngineCore:
    """Not thread-safe except ``add_request`` / ``abort`` intake."""

    def __init__(
        self,
        executor: Executor,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        max_model_len: int,
        vocab_size: int,
        eos_token_id: int,
        sliding_window: int | None = None,
        grammar: GrammarCompiler | None = None,
        num_labels: int = 0,
        pad_token_id: int | None = None,
    ) -> None:
        """``num_labels`` > 0: the model is a classifier (a score head of that many labels, no lm_head): it
        classifies and embeds but cannot generate; ``pad_token_id``: what its pooling skips at the end."""
        self.executor = executor
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos = eos_token_id
        self.grammar = grammar
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        pool = BlockPool(executor.num_blocks, executor.block_size, prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(config, pool, window=sliding_window)
        self.observers: list[Callable[[str, float], None]] = []
        # Every key exists from the start: stats() copies this from another thread while steps update it.
        self.counters: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTERS, 0))

    # ------------------------------------------------------------------ intake (any thread)
    def validate(self, prompt_token_ids: list[int], params: Params) -> None:
        """Raise the error a request would fail with (``cluster.engine.intake``), before it is queued."""
        intake.check(self, prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Params) -> None:
        """Queue a request (a generation, or a pooling request with ``PoolingParams``); raises at once for a bad
        request or a full queue."""
        self.validate(prompt_token_ids, params)
        prompt = params.truncated(list(prompt_token_ids), self.max_model_len)
        now = time.monotonic()
        if isinstance(params, PoolingParams):
            pool = PoolState(params, prompt, self.pad_token_id)
            routed = self.config.enable_return_routed_experts
            req = Request(request_id, prompt, POOLING_SAMPLING, self.tokenizer, now, pool=pool, routed=routed)
            self.scheduler.add(req)
            self.counters["requests_added"] += 1
            return
        routed = params.return_routed_experts or self.config.enable_return_routed_experts
        req = Request(request_id, prompt, params, self.tokenizer, now, routed=routed)
        if params.structured_output is not None:
            if self.grammar is None:
                raise InvalidRequestError("structured output is not available on this engine", param="response_format")
            req.matcher = self.grammar.matcher(params.structured_output)
        self.scheduler.add(req)
        self.counters["requests_added"] += 1

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step runs."""
        self.scheduler.abort(request_id)

    # ------------------------------------------------------------------ state
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_blocks_used(self) -> int:
        """KV blocks some request holds (cached blocks no one holds are free)."""
        return self.scheduler.pool.num_used

    def stats(self) -> dict[str, int | float]:
        pool = self.scheduler.pool
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "rejected_overload": self.scheduler.rejected_overload,
            "num_preemptions": self.scheduler.preemptions,
            "num_blocks": pool.num_blocks,
            "kv_cache_usage": pool.usage(),
            "prefix_cache_queries": pool.queries * pool.block_size,  # tokens, as vLLM counts them
            "prefix_cache_hits": pool.hits * pool.block_size,
            **self.counters,
        }

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        outputs = self.finish_aborted()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return outputs
        layout = StepLayout(scheduled)
        batch = layout.batch()
        for req, _ in scheduled:
            req.steps += 1
        try:
            self._read_cached_routing(scheduled)
            out = self.executor.execute(batch)
        except Exception as e:  # a failed step fails every request in it; the engine itself carries on
            return outputs + self.fail_running(e)
        self.scheduler.computed(scheduled)
        try:
            logits = layout.record(out)
            outputs.extend(self._finish_pooled(req) for req in layout.pooled_done)
            self._sample(layout.sampled, logits, outputs)
        except Exception as e:  # outputs already made (finished requests included) are kept; the rest fail
            return outputs + self.fail_running(e)
        return outputs

    def _read_cached_routing(self, scheduled: list[tuple[Request, SeqChunk]]) -> None:
        """Routed experts of the prefix a request found cached (before this step may overwrite a freed block)."""
        for req, chunk in scheduled:
            if req.routed is not None and req.routed.count < chunk.start:
                req.routed.add(0, self.executor.routed_experts(req.cached_blocks)[: chunk.start])

    def _finish_pooled(self, req: Request) -> RequestOutput:
        """A pooling request whose last prompt token ran: its embedding or label scores, and its blocks freed."""
        assert req.pool is not None
        req.finish_reason = "stop"
        self.counters["finished_stop"] += 1
        self.counters["pooling_requests"] += 1
        self.counters["prompt_tokens"] += len(req.prompt)
        out = self._finish(req)
        out.pooled = req.pool.result()
        return out

    def _sample(self, sampled: list[Request], logits: torch.Tensor, outputs: list[RequestOutput]) -> None:
        """Pick every sampled request's token in one batched call; append its output to ``outputs``.

        What belongs to one request (a row of non-finite logits, its detokenizing, stop strings, logprobs) ends
        that request alone with an ``InternalError``; the others go on.
        """
        now = time.monotonic()
        bad = torch.isnan(logits).any(dim=-1).tolist()
        rows = [
            SamplingRow(
                r.params, r.generator, r.prompt, r.output, r.matcher.allowed() if r.matcher else None, r.bad_words
            )
            for r in sampled
        ]
        tokens = sample(logits, rows, eos_token_id=self.eos).tolist()
        for i, req in enumerate(sampled):
            try:
                if bad[i]:
                    raise FloatingPointError("the model produced NaN logits")
                if tokens[i] < 0:
                    raise InvalidRequestError(
                        "no token satisfies the request's constraints (grammar, min_tokens, logit_bias)",
                        param="response_format" if req.matcher else "min_tokens",
                    )
                if req.matcher is not None:
                    req.matcher.accept(tokens[i])
                n_top = req.params.logprobs
                lp = logprobs_of(logits[i], tokens[i], n_top) if n_top is not None else None
                outputs.append(self._append_token(req, tokens[i], lp, now))
            except Exception as e:
                outputs.append(self._fail(req, e))

    def finish_aborted(self) -> list[RequestOutput]:
        outs = []
        for req in self.scheduler.take_aborted():
            req.finish_reason = "abort"
            self.counters["finished_abort"] += 1
            outs.append(self._finish(req))
        return outs

    def _append_token(self, req: Request, tok: int, lp: TokenLogprob | None, now: float) -> RequestOutput:
        if req.first_token is None:
            req.first_token = now
            self._observe("ttft", now - req.arrival)
        else:
            self._observe("itl", now - (req.last_token or now))
        req.last_token = now
        req.output.append(tok)
        if lp is not None and req.logprobs is not None:
            req.logprobs.append(lp)
        self.counters["generation_tokens"] += 1
        if len(req.output) == 1:
            self.counters["prompt_tokens"] += len(req.prompt)
        p = req.params
        stopped_by_token = (
            (tok == self.eos and not p.ignore_eos)
            or tok in p.stop_token_ids
            or (req.matcher is not None and tok == self.eos)
        )
        if not stopped_by_token or p.include_stop_str_in_output:  # vLLM keeps a stop token's text only then
            req.text += req.detok.add(tok)
        if stopped_by_token and tok in p.stop_token_ids:
            req.stop_reason = tok
        # A complete grammar ends the output like a stop token (its text is whole, nothing was cut).
        ended = stopped_by_token or (req.matcher is not None and req.matcher.done)
        if ended or req.cut_stop_string():
            req.finish_reason = "stop"
        elif len(req.output) >= p.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            if req.finish_reason != "stop" or ended:
                req.text += req.detok.flush()
                if req.finish_reason == "length" and req.cut_stop_string():
                    req.finish_reason = "stop"
            self.counters[f"finished_{req.finish_reason}"] += 1
            return self._finish(req, new=[tok], new_lp=[lp] if lp else None)
        # Hold back characters that could still turn into a stop string.
        upto = len(req.text) - req.holdback
        delta = ""
        if upto > req.emitted:
            delta = req.text[req.emitted : upto]
            req.emitted = upto
        return self._output(req, [tok], delta, [lp] if lp else None)

    def _finish(
        self, req: Request, *, new: list[int] | None = None, new_lp: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        self.scheduler.finish(req)
        delta = req.text[req.emitted :]
        req.emitted = len(req.text)
        out = self._output(req, new or [], delta, new_lp)
        out.finished = True
        out.finish_reason = req.finish_reason
        if req.routed is not None:
            out.routed_experts = req.routed.array()
        return out

    def fail_running(self, error: Exception) -> list[RequestOutput]:
        """End every running request with ``error``: a :class:`MixserveError` as it is (e.g. ``ExpertWorkerError``
        when a worker was lost; logged here once as a warning with its message, since the requests' own errors
        reach only their clients), anything else as an :class:`InternalError` per request, carrying that request's
        id (a bug: logged here once with its traceback)."""
        running = list(self.scheduler.running)
        ids = [r.request_id for r in running]
        if isinstance(error, MixserveError):
            log.warning("step failed for requests %s: %s: %s", ids, type(error).__name__, error.message)
        else:
            log.error("step failed for requests %s", ids, exc_info=error)
        return [self._fail(req, error, logged=True) for req in running]

    def _fail(self, req: Request, error: Exception, *, logged: bool = False) -> RequestOutput:
        """End one request with ``error`` (a non-MixserveError becomes an InternalError carrying its id)."""
        if not logged and not isinstance(error, MixserveError):
            log.error("request %s failed", req.request_id, exc_info=error)
        req.finish_reason = "error"
        self.counters["finished_error"] += 1
        out = self._finish(req)
        out.error = (
            error
            if isinstance(error, MixserveError)
            else InternalError(
                f"internal error in a model step ({type(error).__name__}); see the server log for request "
                f"{req.request_id}",
                request_id=req.request_id,
            )
        )
        return out

    def _output(self, req: Request, new: list[int], delta: str, new_lp: list[TokenLogprob] | None) -> RequestOutput:
        metrics = {"arrival": req.arrival, "cached_tokens": float(req.cached_tokens)}
        if req.scheduled is not None:
            metrics["queue_time"] = req.scheduled - req.arrival
        if req.first_token is not None:
            metrics["ttft"] = req.first_token - req.arrival
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt,
            token_ids=list(req.output),
            text=req.text[: req.emitted],
            new_token_ids=new,
            delta_text=delta,
            finished=False,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            prompt_logprobs=[None, *req.prompt_logprobs] if req.params.prompt_logprobs is not None else None,
            new_logprobs=new_lp,
            metrics=metrics,
            stop_reason=req.stop_reason,
        )

    def _observe(self, name: str, value: float) -> None:
        for obs in self.observers:
            with contextlib.suppress(Exception):
                obs(name, value)

    # ------------------------------------------------------------------ offline use (cluster.engine.offline)
    def generate(
        self,
        prompts: Sequence[list[int]],
        params: Sequence[Params],
        on_finished: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run the prompts until all finish (idle engine only); outputs in prompt order (``on_finished(i, out)``
        as prompt i finishes: a progress bar)."""
        return offline.generate(self, prompts, params, on_finished)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence float32 logits [len, V] (idle engine only)."""
        return offline.logits(self, token_ids)
