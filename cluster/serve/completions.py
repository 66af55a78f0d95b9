"""POST /v1/completions: prompts (text or token ids, one or a batch) times ``n`` choices, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import Response

from cluster.engine import RequestOutput
from cluster.errors import PromptTooLongError
from cluster.serve.context import ServeContext
from cluster.serve.logprobs import completion_logprobs
from cluster.serve.protocol import CompletionRequest
from cluster.serve.responses import (
    CompletionChoice,
    CompletionResponse,
    CompletionStreamResponse,
    Usage,
    finish_reason,
    json_response,
)
from cluster.serve.streams import sse_response
from cluster.serve.structured import request_constraint, submit_constrained

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
    choices = await submit_constrained(ctx, prompts, params, req.n, request_id, constraint)
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    echo = {c.index: (await ctx.decode(c.prompt_ids) if req.echo else "") for c in choices}

    if not req.stream:
        finals: dict[int, RequestOutput] = {}
        async for c, out in ctx.frontend.merged(choices, t0):
            if out.finished:
                finals[c.index] = out
        return json_response(
            CompletionResponse(
                id=request_id,
                created=created,
                model=ctx.model_name,
                choices=[
                    CompletionChoice(
                        index=i,
                        text=echo[i] + out.text,
                        logprobs=completion_logprobs(ctx.tokenizer, out.logprobs, len(echo[i])),
                        finish_reason=finish_reason(out.finish_reason),
                    )
                    for i, out in sorted(finals.items())
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
        if req.echo:
            for i, t in echo.items():
                yield chunk([CompletionChoice(index=i, text=t)])
        async for c, out in ctx.frontend.merged(choices, t0):
            completion_tokens += len(out.new_token_ids)
            if not out.delta_text and not out.finished and not out.new_logprobs:
                continue
            lp = completion_logprobs(ctx.tokenizer, out.new_logprobs, offsets[c.index])
            offsets[c.index] += len(out.delta_text)
            reason = finish_reason(out.finish_reason)
            yield chunk([CompletionChoice(index=c.index, text=out.delta_text, logprobs=lp, finish_reason=reason)])
        if include_usage:
            yield chunk([], Usage.of(prompt_tokens, completion_tokens))

    return sse_response(events(), request_id=request_id, on_done=lambda status: ctx.metrics.count(ENDPOINT, status))
