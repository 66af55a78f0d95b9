"""Continuous-batching engine: iteration-level scheduling over a slot-based KV cache.

:class:`EngineCore` is synchronous: ``add_request`` / ``abort`` / ``step``. Each step decodes one token for every
running sequence and prefills newly admitted ones, within a token budget (``max_num_batched_tokens``; long prompts
are prefilled in chunks) and a slot limit (``max_num_seqs``). Requests join between steps and leave as soon as they
finish, so a long request never holds up a short one.

:class:`AsyncEngine` runs the same core in a background thread and hands each request an async stream of
:class:`RequestOutput` deltas; ``LLM.generate`` drives the core directly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cluster.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    MixserveError,
    PromptTooLongError,
)
from cluster.sampling import RequestSampler, SamplingParams, TokenLogprob, logprobs_of
from cluster.tokenizer import IncrementalDetokenizer, Tokenizer
from workers.kv_cache import SeqChunk

if TYPE_CHECKING:
    from workers.frontend import ModelRunner

FinishReason = str  # "stop" | "length" | "abort" | "error"


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler limits.

    max_num_seqs            sequences decoded together (= KV-cache slots)
    max_num_batched_tokens  tokens per step (decode tokens + prefill chunks)
    max_queued_requests     requests waiting for a slot before add_request fails with an overload error
    max_model_len           prompt + max_tokens limit; None takes the model's max_position_embeddings capped at 8192
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_queued_requests: int = 256
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step"
            )
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        if self.max_model_len is None:
            return min(max_position_embeddings, 8192)
        if self.max_model_len > max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                f"({max_position_embeddings})"
            )
        return self.max_model_len


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative ``token_ids``/``text`` and what this step added."""

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
    error: str | None = None
    error_type: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class _Seq:
    def __init__(
        self, request_id: str, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer, arrival: float
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.sampler = RequestSampler(params)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.computed = 0  # tokens already in the KV cache
        self.slot: int | None = None
        self.text = ""  # generated text, stop strings cut off
        self.emitted = 0  # characters of ``text`` already handed out
        self.finish_reason: str | None = None
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class EngineCore:
    """The synchronous scheduler + model step. Not thread-safe except ``add_request``/``abort`` intake."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = config.resolve_max_model_len(runner.config.max_position_embeddings)
        self.eos = runner.config.eos_token_id
        self.vocab_size = runner.config.vocab_size
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._by_id: dict[str, _Seq] = {}
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self.observers: list[Callable[[str, float], None]] = []
        self.counters = collections.Counter()

    # ------------------------------------------------------------------ intake (any thread)
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens} ({total} in all)",
                param="max_tokens" if len(prompt_token_ids) < self.max_model_len else "prompt",
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises at once for a bad request or a full queue."""
        self.validate(prompt_token_ids, params)
        with self._lock:
            if request_id in self._by_id:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            # Requests that a free slot will take at the next step are not waiting for a slot: only the rest count.
            queued = len(self._waiting) - self.runner.kv.free_slots
            if queued >= self.config.max_queued_requests:
                self.counters["rejected_overload"] += 1
                raise EngineOverloadedError(
                    f"the server is overloaded: {queued} requests are already waiting for a slot; retry later"
                )
            seq = _Seq(request_id, list(prompt_token_ids), params, self.tokenizer, time.monotonic())
            self._waiting.append(seq)
            self._by_id[request_id] = seq
            self.counters["requests_added"] += 1

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is freed before the next step runs."""
        with self._lock:
            if request_id in self._by_id:
                self._aborts.append(request_id)

    # ------------------------------------------------------------------ state
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborts)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), **self.counters}

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        outputs = self._apply_aborts()
        chunks, seqs = self._schedule()
        if not chunks:
            return outputs
        tokens: list[int] = []
        logit_rows: list[int] = []
        samplers: list[_Seq] = []
        for seq, chunk in zip(seqs, chunks, strict=True):
            tokens.extend(seq.all_tokens[chunk.start : chunk.start + chunk.n])
            if chunk.start + chunk.n == len(seq.all_tokens):  # the chunk reaches the newest token: sample
                logit_rows.append(len(tokens) - 1)
                samplers.append(seq)
        try:
            logits = self.runner.forward(
                torch.tensor(tokens, dtype=torch.int64), chunks, torch.tensor(logit_rows, dtype=torch.int64)
            )
        except Exception as e:  # a failed step fails every sequence in it; the engine itself carries on
            return outputs + self._fail_running(e)
        for seq, chunk in zip(seqs, chunks, strict=True):
            seq.computed = chunk.start + chunk.n
        now = time.monotonic()
        greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
        picked: dict[int, int] = {}
        if greedy:
            for i, t in zip(greedy, torch.argmax(logits[greedy], dim=-1).tolist(), strict=True):
                picked[i] = t
        for i, seq in enumerate(samplers):
            tok = picked[i] if i in picked else seq.sampler.sample(logits[i])
            lp = logprobs_of(logits[i], tok, seq.params.logprobs) if seq.logprobs is not None else None
            outputs.append(self._append_token(seq, tok, lp, now))
        return outputs

    def _apply_aborts(self) -> list[RequestOutput]:
        with self._lock:
            ids, self._aborts = self._aborts, []
        outs = []
        for rid in ids:
            seq = self._by_id.get(rid)
            if seq is None:
                continue
            with self._lock:
                if seq in self._waiting:
                    self._waiting.remove(seq)
            if seq in self._running:
                self._running.remove(seq)
            seq.finish_reason = "abort"
            self.counters["finished_abort"] += 1
            outs.append(self._finish(seq))
        return outs

    def _schedule(self) -> tuple[list[SeqChunk], list[_Seq]]:
        budget = self.config.max_num_batched_tokens
        chunks: list[SeqChunk] = []
        seqs: list[_Seq] = []
        for seq in self._running:  # decodes first: one token each
            if not seq.prefilling:
                chunks.append(SeqChunk(slot=seq.slot, start=seq.computed, n=1))
                seqs.append(seq)
                budget -= 1
        for seq in self._running:  # then unfinished prefills, oldest first
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.computed, budget)
                chunks.append(SeqChunk(slot=seq.slot, start=seq.computed, n=n))
                seqs.append(seq)
                budget -= n
        while budget > 0 and self.runner.kv.free_slots > 0:
            with self._lock:  # pop and allocate together, so add_request's free-slot count stays consistent
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
                seq.slot = self.runner.kv.allocate()
            self._running.append(seq)
            n = min(len(seq.prompt), budget)
            chunks.append(SeqChunk(slot=seq.slot, start=0, n=n))
            seqs.append(seq)
            budget -= n
        return chunks, seqs

    def _append_token(self, seq: _Seq, tok: int, lp: TokenLogprob | None, now: float) -> RequestOutput:
        if seq.first_token is None:
            seq.first_token = now
            self._observe("ttft", now - seq.arrival)
        else:
            self._observe("itl", now - (seq.last_token or now))
        seq.last_token = now
        seq.output.append(tok)
        if lp is not None and seq.logprobs is not None:
            seq.logprobs.append(lp)
        self.counters["generation_tokens"] += 1
        if len(seq.output) == 1:
            self.counters["prompt_tokens"] += len(seq.prompt)
        p = seq.params
        stopped_by_token = (tok == self.eos and not p.ignore_eos) or tok in p.stop_token_ids
        if not stopped_by_token:
            seq.text += seq.detok.add(tok)
        if stopped_by_token or self._cut_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if seq.finish_reason != "stop" or stopped_by_token:
                seq.text += seq.detok.flush()
                if seq.finish_reason == "length" and self._cut_stop_string(seq):
                    seq.finish_reason = "stop"
            self.counters[f"finished_{seq.finish_reason}"] += 1
            self._running.remove(seq)
            return self._finish(seq, new=[tok], new_lp=[lp] if lp else None)
        # Hold back characters that could still turn into a stop string.
        upto = len(seq.text) - max(seq.max_stop - 1, 0)
        delta = ""
        if upto > seq.emitted:
            delta = seq.text[seq.emitted : upto]
            seq.emitted = upto
        return self._output(seq, [tok], delta, [lp] if lp else None)

    def _cut_stop_string(self, seq: _Seq) -> bool:
        if not seq.params.stop:
            return False
        search_from = max(0, seq.emitted - seq.max_stop)
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        seq.text = seq.text[: min(hits)]
        return True

    def _finish(
        self, seq: _Seq, *, new: list[int] | None = None, new_lp: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        if seq.slot is not None:
            self.runner.kv.release(seq.slot)
            seq.slot = None
        with self._lock:
            self._by_id.pop(seq.request_id, None)
        delta = seq.text[seq.emitted :]
        seq.emitted = len(seq.text)
        out = self._output(seq, new or [], delta, new_lp)
        out.finished = True
        out.finish_reason = seq.finish_reason
        return out

    def _fail_running(self, error: Exception) -> list[RequestOutput]:
        outs = []
        message = str(error) if isinstance(error, MixserveError) else f"{type(error).__name__}: {error}"
        for seq in list(self._running):
            self._running.remove(seq)
            seq.finish_reason = "error"
            self.counters["finished_error"] += 1
            out = self._finish(seq)
            out.error = message
            out.error_type = type(error).__name__
            outs.append(out)
        return outs

    def _output(self, seq: _Seq, new: list[int], delta: str, new_lp: list[TokenLogprob] | None) -> RequestOutput:
        metrics = {"arrival": seq.arrival}
        if seq.first_token is not None:
            metrics["ttft"] = seq.first_token - seq.arrival
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt,
            token_ids=list(seq.output),
            text=seq.text[: seq.emitted],
            new_token_ids=new,
            delta_text=delta,
            finished=False,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            new_logprobs=new_lp,
            metrics=metrics,
        )

    def _observe(self, name: str, value: float) -> None:
        for obs in self.observers:
            with contextlib.suppress(Exception):
                obs(name, value)

    # ------------------------------------------------------------------ whole-sequence logits
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence float32 logits [len, V], prefilled in chunks on a free slot. Call only when idle."""
        if not token_ids:
            raise InvalidRequestError("token_ids is empty", param="token_ids")
        if len(token_ids) > self.max_model_len:
            raise PromptTooLongError(
                f"{len(token_ids)} tokens exceed this model's maximum context length of {self.max_model_len}",
                param="token_ids",
            )
        if self.runner.kv.free_slots == 0:
            raise EngineOverloadedError("no free KV-cache slot for a logits request")
        slot = self.runner.kv.allocate()
        try:
            parts = []
            step = self.config.max_num_batched_tokens
            for start in range(0, len(token_ids), step):
                piece = token_ids[start : start + step]
                parts.append(
                    self.runner.forward(
                        torch.tensor(piece, dtype=torch.int64),
                        [SeqChunk(slot=slot, start=start, n=len(piece))],
                        torch.arange(len(piece)),
                    )
                )
            return torch.cat(parts)
        finally:
            self.runner.kv.release(slot)


class AsyncEngine:
    """Runs an :class:`EngineCore` in a background thread; each request gets an async stream of outputs."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mixserve-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.core.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.core.step()
            except Exception as e:  # defensive: the scheduler itself failed; fail everything in flight
                outputs = self.core._fail_running(e)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._queues.get(out.request_id)
            if entry is not None:
                loop, q = entry
                with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
                    loop.call_soon_threadsafe(q.put_nowait, out)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue at once (errors raise before the first item), then yield outputs until finished.

        Leaving the iteration early (client gone, task cancelled) aborts the request and frees its slot.
        """
        if self._stop:
            raise EngineStoppedError("the engine has been shut down")
        rid = request_id or uuid.uuid4().hex
        if rid in self._queues:  # still streamed to someone: a second queue under the same id would steal it
            raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
        q: asyncio.Queue = asyncio.Queue()
        entry = (asyncio.get_running_loop(), q)
        self._queues[rid] = entry
        try:
            self.core.add_request(rid, prompt_token_ids, params)
        except BaseException:
            self._release_queue(rid, entry)
            raise
        self._wake.set()
        return self._stream(rid, entry)

    async def _stream(
        self, rid: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue]
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out: RequestOutput = await entry[1].get()
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            self._release_queue(rid, entry)
            if not finished:
                self.abort(rid)

    def _release_queue(self, rid: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue]) -> None:
        # Only our own entry: the id may already belong to a newer request.
        if self._queues.get(rid) is entry:
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        """Stop the engine thread and end every stream still open (finish_reason "abort", EngineStoppedError)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():  # a step is still running: leave the core alone
            return
        # Nothing steps the core any more: finish what is in flight so that no consumer waits forever.
        for rid in list(self._queues):
            self.core.abort(rid)
        outputs = self.core._apply_aborts()
        for out in outputs:
            out.error = "the engine has been shut down"
            out.error_type = EngineStoppedError.__name__
        self._deliver(outputs)
