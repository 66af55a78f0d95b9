"""POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

``/tokenize`` takes ``{model?, prompt, add_special_tokens?, return_token_strs?}`` or
``{model?, messages, tools?, add_generation_prompt?, continue_final_message?, chat_template_kwargs?, documents?,
return_token_strs?}`` (the ids a chat completion would be prompted with)
and answers ``{count, max_model_len, tokens, token_strs?}``; ``/detokenize`` takes ``{model?, tokens}`` and answers
``{prompt}``.
"""

from __future__ import annotations

from fastapi.responses import Response

from cluster.errors import InvalidRequestError
from cluster.serve.ingress.body import load_json, validate
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from cluster.serve.ingress.openai_api.responses import DetokenizeResponse, TokenizeResponse, json_response
from cluster.serve.ingress.openai_api.tools import as_prompt_tools

TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"


def parse_tokenize(raw: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The chat shape when the body has ``messages``, else the prompt shape."""
    data = load_json(raw) if raw else None
    if isinstance(data, dict) and "messages" in data:
        return validate(data, TokenizeChatRequest)
    return validate(data, TokenizeCompletionRequest)


def parse_detokenize(raw: bytes) -> DetokenizeRequest:
    return validate(load_json(raw) if raw else None, DetokenizeRequest)


async def tokenize(
    ctx: ServeContext, req: TokenizeCompletionRequest | TokenizeChatRequest, request_id: str, t0: float
) -> Response:
    if isinstance(req, TokenizeChatRequest):
        tools = as_prompt_tools(req.tools) if req.tools else None
        ids = await ctx.encode_chat(req.chat(), tools=tools, options=req.chat_options())
    else:
        ids = await ctx.encode(req.prompt, bos=req.add_special_tokens)
    strs = [ctx.tokenizer.id_to_piece(i) for i in ids] if req.return_token_strs else None
    max_model_len = await ctx.frontend.max_model_len()
    return json_response(TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs))


async def detokenize(ctx: ServeContext, req: DetokenizeRequest, request_id: str, t0: float) -> Response:
    vocab = ctx.tokenizer.vocab_size
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequestError(
            f"tokens.{bad}: {req.tokens[bad]} is not a token id of this tokenizer (0 <= id < {vocab})",
            param=f"tokens.{bad}",
        )
    return json_response(DetokenizeResponse(prompt=await ctx.decode(req.tokens)))
