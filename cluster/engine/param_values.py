"""Checks and normal forms of :class:`~cluster.engine.sampling.SamplingParams` values that are more than a range:
logit_bias, stop strings, allowed_token_ids, bad_words, truncate_prompt_tokens (shared with pooling requests), and
the number tests the range checks use. Each problem is a
``SamplingParamsError`` naming the parameter."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cluster.errors import SamplingParamsError


def bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs; JSON object keys (strings of digits) are accepted."""
    items = list(bias.items()) if isinstance(bias, Mapping) else list(bias) if isinstance(bias, Sequence) else None
    pairs: list[tuple[int, float]] = []
    for item in items if items is not None else [None]:
        tok, b = item if isinstance(item, tuple) and len(item) == 2 else (None, None)
        if isinstance(tok, str) and tok.isdigit():
            tok = int(tok)
        if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0 or not is_num(b):
            tok = None
        elif isinstance(b, (int, float)) and -100 <= b <= 100:
            pairs.append((tok, float(b)))
            continue
        raise SamplingParamsError(
            param="logit_bias", message="logit_bias maps token ids (>= 0) to numbers in [-100, 100]"
        )
    return tuple(sorted(pairs))


def allowed_ids(ids: object) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not ids or not all(is_int(i) and i >= 0 for i in ids):
        raise SamplingParamsError(
            param="allowed_token_ids", message="allowed_token_ids must be a non-empty list of token ids (>= 0)"
        )
    return tuple(dict.fromkeys(ids))


def word_list(words: object) -> tuple[str, ...]:
    if not isinstance(words, Sequence) or isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
        raise SamplingParamsError(param="bad_words", message="bad_words must be a list of non-empty strings")
    return tuple(dict.fromkeys(words))


def stop_strings(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if stop is None:
        stop = ()
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise SamplingParamsError(param="stop", message="stop must be a string or a list of strings")
    if any(s == "" for s in stop):
        raise SamplingParamsError(param="stop", message="stop strings must not be empty")
    return tuple(stop)


def in_range(v: object, low: float, high: float) -> bool:
    return is_num(v) and low <= v <= high  # type: ignore[operator]


def int_in(v: object, low: int, high: int) -> bool:
    return is_int(v) and low <= v <= high  # type: ignore[operator]


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: object) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def is_truncation(k: object) -> bool:
    """A valid ``truncate_prompt_tokens``: None, -1 (the context length) or an integer >= 1."""
    return k is None or (isinstance(k, int) and not isinstance(k, bool) and (k >= 1 or k == -1))


def truncated(prompt: list[int], k: int | None, max_model_len: int) -> list[int]:
    """The prompt as a request runs it: its last ``k`` tokens (-1: ``max_model_len``; None: all of it)."""
    if k is None:
        return prompt
    k = max_model_len if k == -1 else k
    return prompt[-k:] if len(prompt) > k else prompt
