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
from cluster.serve.ingress.openai_api.logprobs import chat_logprobs, prompt_logprobs
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest, usage_flags
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
from cluster.serve.ingress.openai_api.routed import routed_fields
from cluster.serve.ingress.openai_api.structured import request_constraint, submit_constrained
from cluster.serve.ingress.openai_api.tool_output import MessageStream, final_message
from cluster.serve.ingress.openai_api.tools import ToolPlan, plan_tools
from cluster.serve.ingress.streams import Choice, sse_response

ENDPOINT = "chat_completions"


async def create_chat_completion(ctx: ServeContext, req: ChatCompletionRequest, request_id: str, t0: float) -> Response:
    """Without max_tokens a choice may use what is left of the context after the prompt (as OpenAI does). The
    response id is ``chatcmpl-<request_id>`` when the client names one."""
    request_id = req.response_id("chatcmpl", request_id)
    plan = plan_tools(req, ctx.tokenizer)
    constraint = request_constraint(req, plan.constraint)
    options = req.chat_options()
    # ChatFormatError: 400, messages / tools / continue_final_message
    prompt = await ctx.encode_chat(req.chat(), tools=plan.prompt_tools, options=options)
    context = await ctx.frontend.max_model_len()
    prompt = req.truncate(prompt, context)
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
        self.echo = req.echoed(req.messages)  # vLLM's chat echo: the final assistant message's text first
        self.as_ids = bool(req.return_tokens_as_token_ids)

    async def whole(self) -> Response:
        ctx = self.ctx
        finals: dict[int, RequestOutput] = {}
        async for c, out in ctx.frontend.merged(self.choices, self.t0):
            if out.finished:
                finals[c.index] = out
        results = []
        for i, out in sorted(finals.items()):
            message, reason = final_message(self.plan, ctx.tokenizer, out)
            if self.echo:
                message.content = self.echo + (message.content or "")
            lp = chat_logprobs(ctx.tokenizer, out.logprobs, self.as_ids)
            results.append(
                ChatCompletionChoice(
                    index=i,
                    message=message,
                    logprobs=lp,
                    finish_reason=reason,
                    stop_reason=out.stop_reason,
                    **routed_fields(out),
                )
            )
        usage = Usage.of(len(self.prompt), sum(len(o.token_ids) for o in finals.values()))
        scored = prompt_logprobs(ctx.tokenizer, finals[0].prompt_logprobs, self.req.prompt_logprobs, self.as_ids)
        return json_response(
            ChatCompletionResponse(
                id=self.request_id,
                created=self.created,
                model=ctx.model_name,
                choices=results,
                usage=usage,
                prompt_logprobs=scored,
            )
        )

    def chunk(
        self,
        index: int,
        delta: ChatDelta,
        finish: FinishReason | None = None,
        logprobs: ChatLogprobs | None = None,
        usage: Usage | None = None,
        final: RequestOutput | None = None,
    ) -> ChatCompletionStreamResponse:
        """``final``: the choice's finished output, whose routed experts (if any) the chunk carries."""
        routed = routed_fields(final) if final is not None else {}
        choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish, **routed)
        return ChatCompletionStreamResponse(
            id=self.request_id, created=self.created, model=self.ctx.model_name, choices=[choice], usage=usage
        )

    async def events(self) -> AsyncIterator[ChatCompletionStreamResponse]:
        """The role first, then content / tool-call deltas per choice; with ``stream_options.continuous_usage_stats``
        every chunk carries the usage so far (the prompt and that choice's tokens), with ``include_usage`` a last
        chunk the whole usage."""
        ctx, req = self.ctx, self.req
        at_end, continuous = usage_flags(req.stream_options)
        generated = {c.index: 0 for c in self.choices}

        def usage(i: int) -> Usage | None:
            return Usage.of(len(self.prompt), generated[i]) if continuous else None

        streams = {c.index: MessageStream(self.plan, ctx.tokenizer) for c in self.choices}
        for c in self.choices:
            yield self.chunk(c.index, ChatDelta(role="assistant", content=""), usage=usage(c.index))
            if self.echo:
                yield self.chunk(c.index, ChatDelta(content=self.echo), usage=usage(c.index))
        async for c, out in ctx.frontend.merged(self.choices, self.t0):
            generated[c.index] += len(out.new_token_ids)
            lp = chat_logprobs(ctx.tokenizer, out.new_logprobs, self.as_ids)
            deltas, reason = streams[c.index].feed(out)
            if lp is not None and not deltas:
                deltas = [ChatDelta()]
            for k, delta in enumerate(deltas):  # this step's logprobs ride on its first delta
                yield self.chunk(c.index, delta, logprobs=lp if k == 0 else None, usage=usage(c.index))
            if out.finished:
                yield self.chunk(c.index, ChatDelta(), reason, usage=usage(c.index), final=out)
        if at_end:
            yield ChatCompletionStreamResponse(
                id=self.request_id,
                created=self.created,
                model=ctx.model_name,
                choices=[],
                usage=Usage.of(len(self.prompt), sum(generated.values())),
            )
