"""POST /v1/chat/completions: the messages (and tools) in the model's chat format, ``n`` choices, whole or streamed;
structured output (:mod:`cluster.serve.ingress.openai_api.structured`) and tool calls
(:mod:`cluster.serve.ingress.openai_api.tools`,
:mod:`cluster.serve.ingress.openai_api.tool_output`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import Response

from cluster.engine.request import RequestOutput
from cluster.errors import PromptTooLongError
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api.logprobs import chat_logprobs
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest
from cluster.serve.ingress.openai_api.responses import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    FinishReason,
    Usage,
    json_response,
)
from cluster.serve.ingress.openai_api.structured import request_constraint, submit_constrained
from cluster.serve.ingress.openai_api.tool_output import MessageStream, final_message
from cluster.serve.ingress.openai_api.tools import ToolPlan, plan_tools
from cluster.serve.ingress.streams import Choice, sse_response

ENDPOINT = "chat_completions"


async def create_chat_completion(ctx: ServeContext, req: ChatCompletionRequest, request_id: str, t0: float) -> Response:
    """Without max_tokens a choice may use what is left of the context after the prompt (as OpenAI does)."""
    plan = plan_tools(req, ctx.tokenizer)
    constraint = request_constraint(req, plan.constraint)
    prompt = await ctx.encode_chat(req.chat(), tools=plan.prompt_tools)  # ChatFormatError: 400, messages / tools
    context = await ctx.frontend.max_model_len()
    if len(prompt) >= context:
        raise PromptTooLongError(
            f"this model's maximum context length is {context} tokens; the messages take {len(prompt)}",
            param="messages",
        )
    params = req.params(
        max_tokens_default=context - len(prompt),
        vocab_size=await ctx.frontend.vocab_size(),
        structured=constraint.output if constraint else None,
    )
    choices = await submit_constrained(ctx, [prompt], params, request_id, constraint)
    job = _Chat(ctx, req, plan, request_id=request_id, t0=t0, prompt=prompt, choices=choices)
    if not req.stream:
        return await job.whole()
    return sse_response(job.events(), request_id=request_id, on_done=lambda status: ctx.metrics.count(ENDPOINT, status))


class _Chat:
    """A submitted chat completion: its choices and how their messages are reported, whole or streamed."""

    def __init__(
        self,
        ctx: ServeContext,
        req: ChatCompletionRequest,
        plan: ToolPlan,
        *,
        request_id: str,
        t0: float,
        prompt: list[int],
        choices: list[Choice],
    ) -> None:
        self.ctx, self.req, self.plan, self.request_id, self.t0 = ctx, req, plan, request_id, t0
        self.prompt, self.choices = prompt, choices
        self.created = int(time.time())

    async def whole(self) -> Response:
        ctx = self.ctx
        finals: dict[int, RequestOutput] = {}
        async for c, out in ctx.frontend.merged(self.choices, self.t0):
            if out.finished:
                finals[c.index] = out
        results = []
        for i, out in sorted(finals.items()):
            message, reason = final_message(self.plan, ctx.tokenizer, out)
            lp = chat_logprobs(ctx.tokenizer, out.logprobs)
            results.append(ChatCompletionChoice(index=i, message=message, logprobs=lp, finish_reason=reason))
        usage = Usage.of(len(self.prompt), sum(len(o.token_ids) for o in finals.values()))
        return json_response(
            ChatCompletionResponse(
                id=self.request_id, created=self.created, model=ctx.model_name, choices=results, usage=usage
            )
        )

    def chunk(
        self, index: int, delta: ChatDelta, finish: FinishReason | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionStreamResponse:
        choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return ChatCompletionStreamResponse(
            id=self.request_id, created=self.created, model=self.ctx.model_name, choices=[choice]
        )

    async def events(self) -> AsyncIterator[ChatCompletionStreamResponse]:
        ctx, req = self.ctx, self.req
        completion_tokens = 0
        streams = {c.index: MessageStream(self.plan, ctx.tokenizer) for c in self.choices}
        for c in self.choices:
            yield self.chunk(c.index, ChatDelta(role="assistant", content=""))
        async for c, out in ctx.frontend.merged(self.choices, self.t0):
            completion_tokens += len(out.new_token_ids)
            lp = chat_logprobs(ctx.tokenizer, out.new_logprobs)
            deltas, reason = streams[c.index].feed(out)
            if lp is not None and not deltas:
                deltas = [ChatDelta()]
            for k, delta in enumerate(deltas):  # this step's logprobs ride on its first delta
                yield self.chunk(c.index, delta, logprobs=lp if k == 0 else None)
            if out.finished:
                yield self.chunk(c.index, ChatDelta(), reason)
        if req.stream_options and req.stream_options.include_usage:
            yield ChatCompletionStreamResponse(
                id=self.request_id,
                created=self.created,
                model=ctx.model_name,
                choices=[],
                usage=Usage.of(len(self.prompt), completion_tokens),
            )
