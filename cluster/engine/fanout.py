"""``n`` and ``best_of``: one request's choices as engine requests, and which of them to return. The one
implementation the offline API, the HTTP routes and gRPC use (the engine itself runs ``n = 1`` only).

A prompt with ``SamplingParams(n, best_of)`` becomes ``candidates`` = best_of (else n) engine requests;
:func:`expand` gives their parameters: candidate j samples with seed + j when a seed is given (so the choices
differ), and when candidates > n every token's logprob is kept to rank them. :func:`keep` then picks the n to
return: all of them in order, or the n most likely (highest summed logprob), best first.

Example: n=1, best_of=3, seed=7 -> three requests seeded 7, 8, 9 with logprobs=0; their summed logprobs
(-4, -2, -9) -> keep [1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cluster.engine.request import RequestOutput
from cluster.engine.sampling import SamplingParams


def expand(params: SamplingParams) -> list[SamplingParams]:
    """The parameters of each candidate of one prompt (``params.candidates`` of them), each with n = 1."""
    k = params.candidates
    ranked = k > params.n
    out = []
    for j in range(k):
        seed = params.seed + j if params.seed is not None and k > 1 else params.seed
        logprobs = 0 if ranked and params.logprobs is None else params.logprobs
        out.append(dataclasses.replace(params, seed=seed, n=1, best_of=None, logprobs=logprobs))
    return out


def keep(outputs: Sequence[RequestOutput], params: SamplingParams) -> list[int]:
    """Indices (into one prompt's finished candidates, in candidate order) of the n to return, best first when
    ranked. Missing logprobs count as 0."""
    if params.candidates == params.n:
        return list(range(len(outputs)))
    order = sorted(range(len(outputs)), key=lambda i: -sum(lp.logprob for lp in outputs[i].logprobs or []))
    return order[: params.n]


def chosen(outputs: Sequence[RequestOutput], params: SamplingParams) -> list[RequestOutput]:
    """The outputs :func:`keep` picks, without the logprobs kept only for ranking (when none were asked)."""
    picked = [outputs[i] for i in keep(outputs, params)]
    if params.candidates > params.n and params.logprobs is None:
        for o in picked:
            o.logprobs = o.new_logprobs = None
    return picked
