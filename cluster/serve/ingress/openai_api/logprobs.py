"""The engine's token logprobs in OpenAI's two shapes (legacy completions and chat), with each token's text."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.engine.sampling import TokenLogprob
from cluster.serve.ingress.openai_api.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
)
from cluster.text.tokenizer import Tokenizer


def piece_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text: its sentencepiece piece with the word-start marker as a space."""
    return tokenizer.id_to_piece(token_id).replace("\u2581", " ")


def completion_logprobs(
    tokenizer: Tokenizer, lps: Sequence[TokenLogprob] | None, offset: int
) -> CompletionLogprobs | None:
    """``text_offset`` counts characters from ``offset`` (the length of the text before these tokens)."""
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in lps:
        t = piece_text(tokenizer, lp.token_id)
        tokens.append(t)
        token_lps.append(lp.logprob)
        tops.append({piece_text(tokenizer, i): v for i, v in lp.top})
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def echoed_logprobs(
    tokenizer: Tokenizer, prompt: Sequence[int], scored: Sequence[TokenLogprob | None]
) -> CompletionLogprobs:
    """The prompt's tokens as echoed: each scored given the ones before it (the first has no logprob)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = 0
    for tok, lp in zip(prompt, scored, strict=True):
        t = piece_text(tokenizer, tok)
        tokens.append(t)
        token_lps.append(lp.logprob if lp is not None else None)
        tops.append({piece_text(tokenizer, i): v for i, v in lp.top} if lp is not None else None)
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def joined(first: CompletionLogprobs | None, then: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """Two stretches of logprobs as one (echoed prompt, then the completion)."""
    if first is None or then is None:
        return then if first is None else first
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def chat_logprobs(tokenizer: Tokenizer, lps: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        t = piece_text(tokenizer, lp.token_id)
        top = []
        for i, v in lp.top:
            ti = piece_text(tokenizer, i)
            top.append(ChatTopLogprob(token=ti, logprob=v, bytes=list(ti.encode("utf-8"))))
        content.append(ChatTokenLogprob(token=t, logprob=lp.logprob, bytes=list(t.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)
