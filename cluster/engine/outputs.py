"""The offline API's results in vLLM's shape: one :class:`~cluster.engine.request.RequestOutput` per prompt whose
``outputs`` are its choices as :class:`~cluster.engine.request.CompletionOutput` s, logprobs as vLLM's
``list[dict[token id, Logprob]]``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cluster.engine.request import CompletionOutput, Logprob, RequestOutput
from cluster.engine.sampling import TokenLogprob
from cluster.text.tokenizer import Tokenizer


def vllm_logprobs(tokenizer: Tokenizer, lps: Sequence[TokenLogprob]) -> list[dict[int, Logprob]]:
    """Per token: the chosen token (its rank among all tokens) and then the top alternatives (ranks 1..k), each
    with its text (``Tokenizer.token_text``), as vLLM's sample logprobs."""
    out = []
    for lp in lps:
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, tokenizer.token_text(lp.token_id))}
        for rank, (token, value) in enumerate(lp.top, start=1):
            entry.setdefault(token, Logprob(value, rank, tokenizer.token_text(token)))
        out.append(entry)
    return out


def completion_output(tokenizer: Tokenizer, index: int, out: RequestOutput) -> CompletionOutput:
    """One finished engine request as choice ``index`` of its prompt."""
    lps = out.logprobs
    return CompletionOutput(
        index=index,
        text=out.text,
        token_ids=list(out.token_ids),
        cumulative_logprob=sum(lp.logprob for lp in lps) if lps is not None else None,
        logprobs=vllm_logprobs(tokenizer, lps) if lps is not None else None,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        routed_experts=out.routed_experts,
    )


def prompt_output(tokenizer: Tokenizer, prompt: str | None, choices: Sequence[RequestOutput]) -> RequestOutput:
    """A prompt's finished choices (in the order they are returned) as one RequestOutput: ``outputs`` holds them
    all; the other fields are the first choice's."""
    first = choices[0]
    return dataclasses.replace(
        first,
        prompt=prompt,
        outputs=[completion_output(tokenizer, j, o) for j, o in enumerate(choices)],
        num_cached_tokens=int(first.metrics.get("cached_tokens", 0)),
    )
