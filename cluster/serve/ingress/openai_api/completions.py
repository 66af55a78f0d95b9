"""POST /v1/completions: prompts (text or token ids, one or a batch) times ``n`` choices, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import Response

from cluster.engine import fanout
from cluster.engine.request import RequestOutput
from cluster.engine.sampling import SamplingParams
from cluster.errors import PromptTooLongError
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api.logprobs import completion_logprobs, echoed_logprobs, joined, prompt_logprobs
from cluster.serve.ingress.openai_api.protocol import CompletionRequest, usage_flags
from cluster.serve.ingress.openai_api.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamResponse,
    Usage,
    finish_reason,
    json_response,
)
from cluster.serve.ingress.openai_api.routed import routed_fields
from cluster.serve.ingress.openai_api.structured import request_constraint, submit_constrained
from cluster.serve.ingress.streams import Choice, sse_response

ENDPOINT = "completions"


async def create_completion(ctx: ServeContext, req: CompletionRequest, request_id: str, t0: float) -> Response:
    """``request_id`` is the response id (``cmpl-<request_id>`` when the client names one); choice i runs as engine
    request ``<response id>-<i>``."""
    request_id = req.response_id("cmpl", request_id)
    constraint = request_constraint(req)
    params = req.params(
        vocab_size=await ctx.frontend.vocab_size(), structured=constraint.output if constraint else None
    )
    prompts = await _encode_prompts(ctx, req)
    choices = await submit_constrained(ctx, prompts, params, request_id, constraint)
    echo = {c.index: (await ctx.decode(c.prompt_ids) if req.echo else "") for c in choices}
    job = _Completion(ctx, req, params, request_id=request_id, t0=t0, choices=choices, echo=echo)
    if not req.stream:
        return await job.whole()
    return sse_response(job.events(), request_id=request_id, on_done=lambda status: ctx.metrics.count(ENDPOINT, status))


async def _encode_prompts(ctx: ServeContext, req: CompletionRequest) -> list[list[int]]:
    """Every prompt's token ids; a prompt that cannot fit stops the request before the next one is tokenized."""
    context = await ctx.frontend.max_model_len()
    prompts: list[list[int]] = []
    for item in req.prompts():
        ids = req.truncate(await ctx.encode(item) if isinstance(item, str) else list(item), context)
        if len(ids) >= context:
            raise PromptTooLongError(
                f"this model's maximum context length is {context} tokens; the prompt has {len(ids)}", param="prompt"
            )
        prompts.append(ids)
    return prompts


class _Completion:
    """A submitted completion request: its choices, echoed prompts and how they are reported, whole or streamed."""

    def __init__(
        self,
        ctx: ServeContext,
        req: CompletionRequest,
        params: SamplingParams,
        *,
        request_id: str,
        t0: float,
        choices: list[Choice],
        echo: dict[int, str],
    ) -> None:
        self.ctx, self.req, self.params, self.request_id, self.t0 = ctx, req, params, request_id, t0
        self.choices, self.echo = choices, echo
        self.prompt_ids = {c.index: c.prompt_ids for c in choices}
        self.prompt_tokens = sum(len(c.prompt_ids) for c in choices) // max(1, params.candidates)
        self.created = int(time.time())
        self.scored = req.echo and req.logprobs is not None  # the echoed prompt's tokens are scored too

    def logprobs_of(self, i: int, out: RequestOutput, offset: int, *, with_prompt: bool) -> CompletionLogprobs | None:
        """Choice ``i``'s logprobs: the echoed prompt's (``with_prompt``), then its completion's."""
        req, tok, as_ids = self.req, self.ctx.tokenizer, bool(self.req.return_tokens_as_token_ids)
        if req.logprobs is None:
            return None
        mine = completion_logprobs(tok, out.new_logprobs if req.stream else out.logprobs, offset, as_ids)
        if with_prompt and out.prompt_logprobs is not None:
            echoed = echoed_logprobs(tok, self.prompt_ids[i], out.prompt_logprobs, req.logprobs, as_ids)
            return joined(echoed, mine)
        return mine

    async def whole(self) -> Response:
        finals: dict[int, RequestOutput] = {}
        async for c, out in self.ctx.frontend.merged(self.choices, self.t0):
            if out.finished:
                finals[c.index] = out
        as_ids = bool(self.req.return_tokens_as_token_ids)
        choices = [
            CompletionChoice(
                index=k,
                text=self.echo[i] + finals[i].text,
                logprobs=self.logprobs_of(i, finals[i], len(self.echo[i]), with_prompt=self.scored),
                finish_reason=finish_reason(finals[i].finish_reason),
                stop_reason=finals[i].stop_reason,
                prompt_logprobs=prompt_logprobs(
                    self.ctx.tokenizer, finals[i].prompt_logprobs, self.req.prompt_logprobs, as_ids
                ),
                **routed_fields(finals[i]),
            )
            for k, i in enumerate(best_of(finals, self.params))
        ]
        usage = Usage.of(self.prompt_tokens, sum(len(o.token_ids) for o in finals.values()))
        return json_response(
            CompletionResponse(
                id=self.request_id, created=self.created, model=self.ctx.model_name, choices=choices, usage=usage
            )
        )

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=self.request_id, created=self.created, model=self.ctx.model_name, choices=choices, usage=usage
        )

    async def events(self) -> AsyncIterator[CompletionStreamResponse]:
        """Text deltas per choice; with ``stream_options.continuous_usage_stats`` every chunk carries the usage so
        far (the prompt and that choice's tokens), with ``include_usage`` a last chunk the whole usage."""
        req, echo = self.req, self.echo
        at_end, continuous = usage_flags(req.stream_options)
        generated = dict.fromkeys(echo, 0)
        offsets = {i: len(t) for i, t in echo.items()}
        echoed: set[int] = set()

        def chunk(i: int, choice: CompletionChoice) -> CompletionStreamResponse:
            prompt = len(self.prompt_ids[i])
            return self.chunk([choice], Usage.of(prompt, generated[i]) if continuous else None)

        if req.echo and not self.scored:  # with logprobs the echo waits for the prompt's scores (the first output)
            for i, t in echo.items():
                yield chunk(i, CompletionChoice(index=i, text=t))
        async for c, out in self.ctx.frontend.merged(self.choices, self.t0):
            generated[c.index] += len(out.new_token_ids)
            if not out.delta_text and not out.finished and not out.new_logprobs:
                continue
            first = self.scored and c.index not in echoed
            lp = self.logprobs_of(c.index, out, offsets[c.index], with_prompt=first)
            if first:
                echoed.add(c.index)
                yield chunk(c.index, CompletionChoice(index=c.index, text=echo[c.index]))
            offsets[c.index] += len(out.delta_text)
            reason = finish_reason(out.finish_reason)
            stop = out.stop_reason if out.finished else None
            choice = CompletionChoice(
                index=c.index,
                text=out.delta_text,
                logprobs=lp,
                finish_reason=reason,
                stop_reason=stop,
                **routed_fields(out),  # the finished output's only
            )
            yield chunk(c.index, choice)
        if at_end:
            yield self.chunk([], Usage.of(self.prompt_tokens, sum(generated.values())))


def best_of(finals: dict[int, RequestOutput], params: SamplingParams) -> list[int]:
    """Choice indices (prompt-major, ``params.candidates`` per prompt) to return, prompt by prompt, as
    :func:`cluster.engine.fanout.keep` picks them."""
    k = params.candidates
    kept = []
    for first in range(0, len(finals), k):
        group = list(range(first, first + k))
        kept += [group[i] for i in fanout.keep([finals[i] for i in group], params)]
    return kept
