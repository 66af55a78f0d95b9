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
from cluster.serve.ingress.openai_api.logprobs import completion_logprobs, echoed_logprobs, joined
from cluster.serve.ingress.openai_api.protocol import CompletionRequest
from cluster.serve.ingress.openai_api.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamResponse,
    Usage,
    finish_reason,
    json_response,
)
from cluster.serve.ingress.openai_api.structured import request_constraint, submit_constrained
from cluster.serve.ingress.streams import sse_response

ENDPOINT = "completions"


async def create_completion(ctx: ServeContext, req: CompletionRequest, request_id: str, t0: float) -> Response:
    """``request_id`` is the response id; choice i runs as engine request ``<request_id>-<i>``."""
    items = req.prompts()
    constraint = request_constraint(req)
    params = req.params(
        vocab_size=await ctx.frontend.vocab_size(), structured=constraint.output if constraint else None
    )
    context = await ctx.frontend.max_model_len()
    prompts: list[list[int]] = []
    for item in items:  # a prompt that cannot fit stops the request before the next one is tokenized
        ids = await ctx.encode(item) if isinstance(item, str) else list(item)
        if len(ids) >= context:
            raise PromptTooLongError(
                f"this model's maximum context length is {context} tokens; the prompt has {len(ids)}", param="prompt"
            )
        prompts.append(ids)
    choices = await submit_constrained(ctx, prompts, params, request_id, constraint)
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    echo = {c.index: (await ctx.decode(c.prompt_ids) if req.echo else "") for c in choices}
    prompt_ids = {c.index: c.prompt_ids for c in choices}
    scored = req.echo and req.logprobs is not None

    def logprobs_of(i: int, out: RequestOutput, offset: int, *, with_prompt: bool) -> CompletionLogprobs | None:
        """The choice's logprobs: the echoed prompt's (``with_prompt``), then its completion's."""
        if req.logprobs is None:
            return None
        mine = completion_logprobs(ctx.tokenizer, out.new_logprobs if req.stream else out.logprobs, offset)
        if with_prompt and out.prompt_logprobs is not None:
            return joined(echoed_logprobs(ctx.tokenizer, prompt_ids[i], out.prompt_logprobs), mine)
        return mine

    if not req.stream:
        finals: dict[int, RequestOutput] = {}
        async for c, out in ctx.frontend.merged(choices, t0):
            if out.finished:
                finals[c.index] = out
        kept = best_of(finals, params)
        return json_response(
            CompletionResponse(
                id=request_id,
                created=created,
                model=ctx.model_name,
                choices=[
                    CompletionChoice(
                        index=k,
                        text=echo[i] + finals[i].text,
                        logprobs=logprobs_of(i, finals[i], len(echo[i]), with_prompt=scored),
                        finish_reason=finish_reason(finals[i].finish_reason),
                    )
                    for k, i in enumerate(kept)
                ],
                usage=Usage.of(prompt_tokens, sum(len(o.token_ids) for o in finals.values())),
            )
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=request_id, created=created, model=ctx.model_name, choices=choices, usage=usage
        )

    async def events() -> AsyncIterator[CompletionStreamResponse]:
        completion_tokens = 0
        offsets = {i: len(t) for i, t in echo.items()}
        echoed: set[int] = set()
        if req.echo and not scored:  # with logprobs the echo waits for the prompt's scores (the first output)
            for i, t in echo.items():
                yield chunk([CompletionChoice(index=i, text=t)])
        async for c, out in ctx.frontend.merged(choices, t0):
            completion_tokens += len(out.new_token_ids)
            if not out.delta_text and not out.finished and not out.new_logprobs:
                continue
            first = scored and c.index not in echoed
            lp = logprobs_of(c.index, out, offsets[c.index], with_prompt=first)
            if first:
                echoed.add(c.index)
                yield chunk([CompletionChoice(index=c.index, text=echo[c.index])])
            offsets[c.index] += len(out.delta_text)
            reason = finish_reason(out.finish_reason)
            yield chunk([CompletionChoice(index=c.index, text=out.delta_text, logprobs=lp, finish_reason=reason)])
        if include_usage:
            yield chunk([], Usage.of(prompt_tokens, completion_tokens))

    return sse_response(events(), request_id=request_id, on_done=lambda status: ctx.metrics.count(ENDPOINT, status))


def best_of(finals: dict[int, RequestOutput], params: SamplingParams) -> list[int]:
    """Choice indices (prompt-major, ``params.candidates`` per prompt) to return, prompt by prompt, as
    :func:`cluster.engine.fanout.keep` picks them."""
    k = params.candidates
    kept = []
    for first in range(0, len(finals), k):
        group = list(range(first, first + k))
        kept += [group[i] for i in fanout.keep([finals[i] for i in group], params)]
    return kept
