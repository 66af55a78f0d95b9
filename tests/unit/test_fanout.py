"""``n`` and ``best_of`` (cluster.engine.fanout): one prompt's candidates as engine requests, and which to return.

The offline API, the HTTP routes and gRPC all go through these three functions; here they are checked on their
own, with real ``RequestOutput`` objects whose logprobs are set by hand.
"""

from __future__ import annotations

import dataclasses

import pytest

from cluster.engine import fanout
from cluster.engine.request import RequestOutput
from cluster.engine.sampling import SamplingParams, TokenLogprob


def output(i: int, logprobs: list[float] | None) -> RequestOutput:
    """A finished candidate ``c{i}`` whose tokens have these log-probabilities (None: none were kept)."""
    tokens = [100 + j for j in range(len(logprobs or [0.0]))]
    lps = None if logprobs is None else [TokenLogprob(t, lp, ()) for t, lp in zip(tokens, logprobs, strict=True)]
    return RequestOutput(
        request_id=f"c{i}",
        prompt_token_ids=[1, 5],
        token_ids=tokens,
        text="",
        new_token_ids=[],
        delta_text="",
        finished=True,
        finish_reason="length",
        logprobs=lps,
        new_logprobs=list(lps[-1:]) if lps else None,
    )


def test_expand_seeds_each_candidate_and_asks_for_logprobs_only_to_rank():
    """The docstring's example, n=1 best_of=3 seed=7: three engine requests seeded 7, 8, 9, each n=1 and
    best_of=None, with logprobs=0 (needed to rank them); every other parameter is the request's own."""
    params = SamplingParams(max_tokens=6, temperature=0.8, top_k=5, seed=7, n=1, best_of=3, stop=["x"])
    got = fanout.expand(params)
    assert got == [dataclasses.replace(params, seed=7 + j, n=1, best_of=None, logprobs=0) for j in range(3)]
    assert all(p.candidates == 1 for p in got)


@pytest.mark.parametrize(
    ("n", "best_of", "seed", "logprobs", "seeds", "want_logprobs"),
    [
        (1, None, 7, None, [7], None),  # one candidate: the request as it is
        (1, None, None, None, [None], None),
        (3, None, 7, None, [7, 8, 9], None),  # all returned, none ranked: no logprobs added
        (3, None, None, 2, [None, None, None], 2),  # no seed: each candidate draws its own
        (2, 4, 40, None, [40, 41, 42, 43], 0),  # ranked: each token's logprob kept
        (2, 4, None, 3, [None] * 4, 3),  # logprobs asked for: the request's own number, also when ranked
        (2, 2, 5, None, [5, 6], None),  # best_of == n: nothing to rank
    ],
)
def test_expand_candidates(n, best_of, seed, logprobs, seeds, want_logprobs):
    params = SamplingParams(temperature=1.0, seed=seed, n=n, best_of=best_of, logprobs=logprobs)
    got = fanout.expand(params)
    assert [p.seed for p in got] == seeds
    assert all(p.n == 1 and p.best_of is None and p.logprobs == want_logprobs for p in got)
    assert all(dataclasses.replace(p, seed=seed, n=n, best_of=best_of, logprobs=logprobs) == params for p in got)


def test_keep_the_most_likely_of_best_of():
    """The docstring's example: n=1, best_of=3, summed logprobs (-4, -2, -9) keep candidate 1; n=2 keeps 1 then 0
    (best first); sums, not the last token or the mean, decide."""
    outs = [output(0, [-1.0, -3.0]), output(1, [-2.0]), output(2, [-4.0, -4.0, -1.0])]
    assert fanout.keep(outs, SamplingParams(n=1, best_of=3)) == [1]
    assert fanout.keep(outs, SamplingParams(n=2, best_of=3)) == [1, 0]
    longer = [output(0, [-0.5] * 6), output(1, [-2.5]), output(2, [-1.0, -1.0])]  # sums -3, -2.5, -2; means differ
    assert fanout.keep(longer, SamplingParams(n=1, best_of=3)) == [2]


def test_keep_ties_in_candidate_order_and_all_when_nothing_is_ranked():
    """Equal sums keep their candidate order; missing logprobs count as 0; with candidates == n every output is
    kept in candidate order, whatever its logprobs."""
    tied = [output(0, [-3.0]), output(1, [-1.0, -1.0]), output(2, [-0.5, -1.5]), output(3, [-2.0])]
    assert fanout.keep(tied, SamplingParams(n=3, best_of=4)) == [1, 2, 3]
    assert fanout.keep(tied, SamplingParams(n=4, best_of=4)) == [0, 1, 2, 3]
    assert fanout.keep(tied, SamplingParams(n=4)) == [0, 1, 2, 3]
    missing = [output(0, [-0.1]), output(1, None), output(2, [-0.2])]
    assert fanout.keep(missing, SamplingParams(n=1, best_of=3)) == [1]
    assert fanout.keep(missing, SamplingParams(n=2, best_of=3)) == [1, 0]


def test_chosen_drops_the_logprobs_kept_only_to_rank():
    """``chosen`` returns the kept outputs themselves, best first; logprobs that were added only to rank them are
    removed (both the cumulative and the last step's), logprobs the request asked for stay."""
    outs = [output(0, [-4.0]), output(1, [-2.0]), output(2, [-9.0])]
    picked = fanout.chosen(outs, SamplingParams(n=2, best_of=3))
    assert [o.request_id for o in picked] == ["c1", "c0"]
    assert picked[0] is outs[1] and all(o.logprobs is None and o.new_logprobs is None for o in picked)

    outs = [output(0, [-4.0]), output(1, [-2.0]), output(2, [-9.0])]
    picked = fanout.chosen(outs, SamplingParams(n=1, best_of=3, logprobs=0))
    assert [o.request_id for o in picked] == ["c1"]
    assert picked[0].logprobs == [TokenLogprob(100, -2.0, ())] and picked[0].new_logprobs == picked[0].logprobs

    outs = [output(0, [-4.0]), output(1, [-2.0])]
    picked = fanout.chosen(outs, SamplingParams(n=2, logprobs=1))  # nothing ranked: all, in order, untouched
    assert [o.request_id for o in picked] == ["c0", "c1"] and [o.logprobs is not None for o in picked] == [True] * 2
