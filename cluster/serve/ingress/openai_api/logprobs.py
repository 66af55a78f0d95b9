"""The engine's token logprobs in OpenAI's two shapes (legacy completions and chat) and vLLM's prompt_logprobs,
with each token's text: what it adds to the text (a byte-fallback piece ``<0x0A>`` is ``"\\n"``, its ``bytes``
``[10]``, as OpenAI and vLLM report it), or ``token_id:<id>`` with vLLM's ``return_tokens_as_token_ids``."""

from __future__ import annotations

from collections.abc import Sequence

from cluster.engine.sampling import TokenLogprob
from cluster.serve.ingress.openai_api.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprob,
)
from cluster.text.tokenizer import Tokenizer


def piece_text(tokenizer: Tokenizer, token_id: int, as_id: bool = False) -> str:
    """A token's own text (``Tokenizer.token_text``), or ``token_id:<id>`` (``as_id``)."""
    return f"token_id:{token_id}" if as_id else tokenizer.token_text(token_id)


def piece_bytes(tokenizer: Tokenizer, token_id: int, as_id: bool = False) -> list[int]:
    """The bytes of :func:`piece_text`: the token's own bytes (a lone byte of a longer character included)."""
    return list(piece_text(tokenizer, token_id, True).encode()) if as_id else list(tokenizer.token_bytes(token_id))


def completion_logprobs(
    tokenizer: Tokenizer, lps: Sequence[TokenLogprob] | None, offset: int, as_ids: bool = False
) -> CompletionLogprobs | None:
    """``text_offset`` counts characters from ``offset`` (the length of the text before these tokens)."""
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in lps:
        t = piece_text(tokenizer, lp.token_id, as_ids)
        tokens.append(t)
        token_lps.append(lp.logprob)
        tops.append({piece_text(tokenizer, i, as_ids): v for i, v in lp.top})
        offsets.append(pos)
        pos += len(tokenizer.token_text(lp.token_id))
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def echoed_logprobs(
    tokenizer: Tokenizer, prompt: Sequence[int], scored: Sequence[TokenLogprob | None], top_n: int, as_ids: bool = False
) -> CompletionLogprobs:
    """The prompt's tokens as echoed: each scored given the ones before it (the first has no logprob); ``top_n``
    alternatives each."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = 0
    for tok, lp in zip(prompt, scored, strict=True):
        t = piece_text(tokenizer, tok, as_ids)
        tokens.append(t)
        token_lps.append(lp.logprob if lp is not None else None)
        tops.append({piece_text(tokenizer, i, as_ids): v for i, v in lp.top[:top_n]} if lp is not None else None)
        offsets.append(pos)
        pos += len(tokenizer.token_text(tok))
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def prompt_logprobs(
    tokenizer: Tokenizer, scored: Sequence[TokenLogprob | None] | None, top_n: int | None, as_ids: bool = False
) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first) a dict token id -> ``{logprob, rank,
    decoded_token}`` of the prompt token and its ``top_n`` alternatives."""
    if scored is None or top_n is None:
        return None
    out: list[dict[str, PromptLogprob] | None] = []
    for lp in scored:
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(lp.token_id): PromptLogprob(
                logprob=lp.logprob, rank=lp.rank, decoded_token=piece_text(tokenizer, lp.token_id, as_ids)
            )
        }
        for rank, (i, v) in enumerate(lp.top[:top_n], start=1):
            entry.setdefault(
                str(i), PromptLogprob(logprob=v, rank=rank, decoded_token=piece_text(tokenizer, i, as_ids))
            )
        out.append(entry)
    return out


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


def chat_logprobs(
    tokenizer: Tokenizer, lps: Sequence[TokenLogprob] | None, as_ids: bool = False
) -> ChatLogprobs | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        top = [
            ChatTopLogprob(token=piece_text(tokenizer, i, as_ids), logprob=v, bytes=piece_bytes(tokenizer, i, as_ids))
            for i, v in lp.top
        ]
        content.append(
            ChatTokenLogprob(
                token=piece_text(tokenizer, lp.token_id, as_ids),
                logprob=lp.logprob,
                bytes=piece_bytes(tokenizer, lp.token_id, as_ids),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)
