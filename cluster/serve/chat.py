"""POST /v1/chat/completions: the messages in the model's chat format, ``n`` choices, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import Response

from cluster.engine import RequestOutput
from cluster.errors import PromptTooLongError
from cluster.serve.context import ServeContext
from cluster.serve.logprobs import chat_logprobs
from cluster.serve.protocol import ChatCompletionRequest
from cluster.serve.responses import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    Usage,
    finish_reason,
    json_response,
)
from cluster.serve.streams import sse_response

ENDPOINT = "chat_completions"


async def create_chat_completion(ctx: ServeContext, req: ChatCompletionRequest, request_id: str, t0: float) -> Response:
    """Without max_tokens a choice may use what is left of the context after the prompt (as OpenAI does)."""
    prompt = await ctx.encode_chat(req.chat())  # ChatFormatError: 400, param "messages"
    context = await ctx.frontend.max_model_len()
    if len(prompt) >= context:
        raise PromptTooLongError(
            f"this model's maximum context length is {context} tokens; the messages take {len(prompt)}",
            param="messages",
        )
    params = req.params(max_tokens_default=context - len(prompt), vocab_size=await ctx.frontend.vocab_size())
    choices = await ctx.frontend.submit_all([prompt], params, req.n, request_id)
    created = int(time.time())

    if not req.stream:
        finals: dict[int, RequestOutput] = {}
        async for c, out in ctx.frontend.merged(choices, t0):
            if out.finished:
                finals[c.index] = out
        return json_response(
            ChatCompletionResponse(
                id=request_id,
                created=created,
                model=ctx.model_name,
                choices=[
                    ChatCompletionChoice(
                        index=i,
                        message=ChatMessage(content=out.text),
                        logprobs=chat_logprobs(ctx.tokenizer, out.logprobs),
                        finish_reason=finish_reason(out.finish_reason),
                    )
                    for i, out in sorted(finals.items())
                ],
                usage=Usage.of(len(prompt), sum(len(o.token_ids) for o in finals.values())),
            )
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(
        index: int, delta: ChatDelta, finish: str | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionStreamResponse:
        choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason(finish))
        return ChatCompletionStreamResponse(id=request_id, created=created, model=ctx.model_name, choices=[choice])

    async def events() -> AsyncIterator[ChatCompletionStreamResponse]:
        completion_tokens = 0
        for c in choices:
            yield chunk(c.index, ChatDelta(role="assistant", content=""))
        async for c, out in ctx.frontend.merged(choices, t0):
            completion_tokens += len(out.new_token_ids)
            lp = chat_logprobs(ctx.tokenizer, out.new_logprobs)
            if out.delta_text or lp is not None:
                yield chunk(c.index, ChatDelta(content=out.delta_text), logprobs=lp)
            if out.finished:
                yield chunk(c.index, ChatDelta(), out.finish_reason)
        if include_usage:
            yield ChatCompletionStreamResponse(
                id=request_id,
                created=created,
                model=ctx.model_name,
                choices=[],
                usage=Usage.of(len(prompt), completion_tokens),
            )

    return sse_response(events(), request_id=request_id, on_done=lambda status: ctx.metrics.count(ENDPOINT, status))
