"""SamplingParams validation and the batched sampler, checked against independent references.

The reference distributions are computed here in plain Python floats (math.exp), not with torch, so a wrong
temperature, a top-k/top-p off by one or a renormalisation bug in ``cluster.engine.sampling.sample`` shows up as a
mismatch; penalties, min_p, min_tokens and logit_bias are checked against transformers' logits processors or
against their definitions written out here.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter

import pytest
import torch

from cluster.engine.sampling import (
    MAX_LOGPROBS,
    SamplingParams,
    SamplingParamsError,
    SamplingRow,
    logprobs_of,
    new_generator,
    sample,
)

# ---------------------------------------------------------------------------------------------- reference


def ref_probs(logits: list[float], *, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> list[float]:
    """The target distribution, vLLM/OpenAI semantics: temperature, then top-k, then the top-p nucleus
    (the smallest set of most likely tokens whose probability reaches top_p), renormalised."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order if top_k in (0, -1) else order[:top_k]
    m = max(scaled[i] for i in keep)
    weights = {i: math.exp(scaled[i] - m) for i in keep}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1.0:
        nucleus, mass = [], 0.0
        for i in keep:  # keep is sorted by probability, descending
            nucleus.append(i)
            mass += probs[i]
            if mass >= top_p:
                break
        total = sum(probs[i] for i in nucleus)
        probs = {i: probs[i] / total for i in nucleus}
    return [probs.get(i, 0.0) for i in range(len(logits))]


class RequestSampler:
    """One request's draws through the batched sampler (a batch of one row)."""

    def __init__(self, params: SamplingParams, prompt: list[int] | None = None) -> None:
        self.params = params
        self.generator = new_generator(params)
        self.prompt = prompt or []
        self.output: list[int] = []

    def sample(self, row: torch.Tensor) -> int:
        tok = int(
            sample(row[None], [SamplingRow(self.params, self.generator, self.prompt, self.output)], eos_token_id=2)[0]
        )
        return tok


def draw(params: SamplingParams, logits: list[float], n: int) -> list[int]:
    sampler = RequestSampler(params)
    row = torch.tensor(logits, dtype=torch.float32)
    return [sampler.sample(row) for _ in range(n)]


def chi_square(counts: Counter, probs: list[float], n: int) -> tuple[float, int]:
    """Pearson statistic over the tokens with non-zero reference probability, and its degrees of freedom."""
    support = [i for i, p in enumerate(probs) if p > 0]
    stat = sum((counts.get(i, 0) - n * probs[i]) ** 2 / (n * probs[i]) for i in support)
    return stat, len(support) - 1


# 99.9% quantiles of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 9: 27.88}

LOGITS = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -2.0]  # token 0 best, then 6, 1, 2, 3, 4, 5, 7
N_DRAWS = 6000


def check_distribution(params: SamplingParams, logits: list[float], expected: list[float]) -> Counter:
    picks = draw(params, logits, N_DRAWS)
    counts = Counter(picks)
    support = {i for i, p in enumerate(expected) if p > 0}
    assert set(counts) <= support, f"sampled outside the allowed set {sorted(support)}: {sorted(set(counts))}"
    freq = [counts.get(i, 0) / N_DRAWS for i in range(len(logits))]
    assert max(abs(f - p) for f, p in zip(freq, expected, strict=True)) < 0.03, (freq, expected)
    stat, df = chi_square(counts, expected, N_DRAWS)
    if df > 0:
        assert stat < CHI2_999[df], f"chi-square {stat:.1f} with {df} dof: {freq} vs {expected}"
    return counts


# ---------------------------------------------------------------------------------------------- tests


def test_reference_itself():
    # The reference is what the tests rely on: pin it on hand-computed cases.
    p = ref_probs([math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)], top_p=0.65)
    assert p == pytest.approx([0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0])
    p = ref_probs([math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)], top_p=0.75)
    assert p == pytest.approx([0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0])
    p = ref_probs([0.0, 1.0, 2.0], top_k=2, temperature=0.5)
    assert p == pytest.approx([0.0, 1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_distribution_matches_softmax(temperature):
    check_distribution(
        SamplingParams(temperature=temperature, seed=11), LOGITS, ref_probs(LOGITS, temperature=temperature)
    )


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_top_k_restricts_support_to_k_best(top_k):
    expected = ref_probs(LOGITS, temperature=0.8, top_k=top_k)
    counts = check_distribution(SamplingParams(temperature=0.8, top_k=top_k, seed=5), LOGITS, expected)
    best = sorted(range(len(LOGITS)), key=lambda i: -LOGITS[i])[:top_k]
    assert set(counts) == set(best)  # every one of the k best is reachable, nothing else is


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.35, {0}), (0.5, {0, 1}), (0.65, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    probs = [0.4, 0.3, 0.2, 0.08, 0.02]
    logits = [math.log(p) for p in probs]
    expected = ref_probs(logits, top_p=top_p)
    assert {i for i, p in enumerate(expected) if p > 0} == nucleus
    counts = check_distribution(SamplingParams(temperature=1.0, top_p=top_p, seed=3), logits, expected)
    assert set(counts) == nucleus


def test_top_p_reached_exactly_stops_the_nucleus():
    # Four equally likely tokens (0.25 each, exact in float): top_p 0.5 is reached by two of them, so exactly
    # two are kept (a strict comparison would keep a third); top_p 0.75 keeps three.
    for top_p, size in ((0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)):
        picks = draw(SamplingParams(temperature=1.0, top_p=top_p, seed=4), [0.0, 0.0, 0.0, 0.0], 2000)
        counts = Counter(picks)
        assert len(counts) == size, (top_p, counts)
        assert max(abs(n / 2000 - 1 / size) for n in counts.values()) < 0.05


def test_top_p_applies_after_temperature_and_top_k():
    # Temperature 0.5 sharpens [0.4, 0.3, 0.2, 0.08, 0.02] to about [0.53, 0.30, 0.13, 0.02, 0.001]; with top_k=3
    # and top_p=0.8 the nucleus of the renormalised top 3 is {0, 1}.
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.08, 0.02)]
    expected = ref_probs(logits, temperature=0.5, top_k=3, top_p=0.8)
    assert [i for i, p in enumerate(expected) if p > 0] == [0, 1]
    check_distribution(SamplingParams(temperature=0.5, top_k=3, top_p=0.8, seed=9), logits, expected)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 1000, generator=g) * 3
    greedy = RequestSampler(SamplingParams(temperature=0))
    top1 = RequestSampler(SamplingParams(temperature=1.5, top_k=1, seed=1))
    tiny_p = RequestSampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=2))
    for row in rows:
        best = int(row.argmax())
        assert greedy.sample(row) == best
        assert top1.sample(row) == best
        assert tiny_p.sample(row) == best


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    sampler = RequestSampler(SamplingParams(temperature=0, seed=7))
    assert sampler.generator is None
    assert sampler.sample(torch.tensor([0.1, 3.0, 2.9])) == 1


def test_seeded_sampler_is_reproducible_and_seeds_differ():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 500, generator=g)

    def run(seed):
        s = RequestSampler(SamplingParams(temperature=1.0, top_p=0.95, top_k=100, seed=seed))
        return [s.sample(r) for r in rows]

    assert run(1234) == run(1234)
    assert run(1234) != run(1235)
    # Without a seed every request draws its own fresh seed.
    a = new_generator(SamplingParams(temperature=1.0))
    b = new_generator(SamplingParams(temperature=1.0))
    assert a is not None and b is not None and a.initial_seed() != b.initial_seed()
    # A seed at the edges of the accepted range works and is just as reproducible.
    for seed in (-(2**63), 2**64 - 1, 0):
        assert run(seed) == run(seed)
        assert all(0 <= t < 500 for t in run(seed))


def test_seeded_sampler_does_not_depend_on_global_rng():
    row = torch.randn(300, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    a = draw(SamplingParams(temperature=1.0, seed=77), row.tolist(), 30)
    torch.manual_seed(999)
    torch.rand(1000)
    b = draw(SamplingParams(temperature=1.0, seed=77), row.tolist(), 30)
    assert a == b


def test_logprobs_of_matches_log_softmax():
    row = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 2
    ref = [x - math.log(sum(math.exp(y) for y in row.tolist())) for x in row.tolist()]
    lp = logprobs_of(row, 17, 5)
    assert lp.token_id == 17
    assert lp.logprob == pytest.approx(ref[17], abs=1e-4)
    best = sorted(range(1000), key=lambda i: -ref[i])[:5]
    assert [t for t, _ in lp.top] == best
    assert [v for _, v in lp.top] == pytest.approx([ref[i] for i in best], abs=1e-4)
    assert logprobs_of(row, 3, 0).top == ()
    assert len(logprobs_of(row, 3, MAX_LOGPROBS).top) == MAX_LOGPROBS


# ---------------------------------------------------------------------------------------------- validation

BAD_PARAMS = [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("max_tokens", None),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", True),
    ("temperature", "1"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", float("nan")),
    ("top_p", False),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", True),
    ("seed", 1.0),
    ("seed", "3"),
    ("seed", True),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", True),
    ("logprobs", 1.0),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("stop", [""]),
    ("stop", ["a", 3]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMS, ids=[f"{f}={v!r}" for f, v in BAD_PARAMS])
def test_out_of_range_params_name_the_field(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert field in str(err.value)
    # It crosses Ray (actor replies) intact: same class, message and field.
    back = pickle.loads(pickle.dumps(err.value))
    assert (type(back), str(back), back.param) == (SamplingParamsError, str(err.value), field)


def test_valid_params_and_normalisation():
    p = SamplingParams(
        max_tokens=1, temperature=100, top_p=1, top_k=0, seed=-5, stop="END", stop_token_ids=[5, 6], logprobs=20
    )
    assert p.stop == ("END",)
    assert p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(top_k=-1, top_p=1e-9, logprobs=0, temperature=0).logprobs == 0
    hash(SamplingParams(stop=["x"], stop_token_ids=[1]))  # frozen and hashable after normalisation


# ---------------------------------------------------------------------------------------------- penalties & co


def reference_processed(
    params: SamplingParams, row: torch.Tensor, prompt: list[int], output: list[int], eos: int
) -> torch.Tensor:
    """min_tokens, logit_bias and penalties from their definitions: transformers' processors where it has them
    (repetition penalty, min new tokens), the OpenAI formula for presence/frequency, plain addition for the bias."""
    from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    x = row.clone()[None]
    ids = torch.tensor([prompt + output])
    if params.min_tokens:
        stops = [eos, *params.stop_token_ids]
        x = MinNewTokensLengthLogitsProcessor(len(prompt), params.min_tokens, stops)(ids, x)
    for t, b in dict(params.logit_bias).items():
        x[0, t] += b
    if params.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, x)
    counts = Counter(output)
    for t, c in counts.items():  # mu[j] - c[j] * frequency - (c[j] > 0) * presence
        x[0, t] -= c * params.frequency_penalty + params.presence_penalty
    return x[0]


@pytest.mark.parametrize(
    "params",
    [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.7),
        dict(frequency_penalty=0.9),
        dict(presence_penalty=-1.5),
        dict(frequency_penalty=0.4, presence_penalty=0.6, repetition_penalty=1.2),
        dict(logit_bias={3: 2.5, 7: -100, 11: 0.75}),
        dict(min_tokens=4, stop_token_ids=[5]),
    ],
    ids=["rep>1", "rep<1", "frequency", "presence", "all-three", "logit-bias", "min-tokens"],
)
def test_greedy_choice_follows_the_processed_logits(params):
    """Over many random rows, prompts and outputs, the greedy token is the argmax of the reference-processed logits,
    and a batch that mixes these rows with plain ones changes nothing for either."""
    g = torch.Generator().manual_seed(5)
    V, eos = 16, 2
    sp = SamplingParams(temperature=0, max_tokens=8, **params)
    plain = SamplingParams(temperature=0)
    rows, batch, want = [], [], []
    for _ in range(200):
        logit = torch.randn(V, generator=g) * 2
        prompt = torch.randint(0, V, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(0, V, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        rows.append(logit)
        batch.append(SamplingRow(sp, None, prompt, output))
        want.append(int(reference_processed(sp, logit, prompt, output, eos).argmax()))
        rows.append(logit)
        batch.append(SamplingRow(plain, None, prompt, output))
        want.append(int(logit.argmax()))
    got = sample(torch.stack(rows), batch, eos_token_id=eos).tolist()
    assert got == want
    assert sum(a != b for a, b in zip(want[::2], want[1::2], strict=True)) > 10  # the processing mattered


def test_frequency_penalty_counts_every_occurrence():
    """Greedy rows where token 3 leads token 5 by 1.2: a frequency penalty of 0.5 takes 0.5 off per occurrence of a
    token in the output (not per distinct token, and not for the prompt), so token 3 keeps the lead while it
    occurred at most twice and loses it from the third time on; a negative penalty (-0.5 per occurrence of token
    5) lifts 5 above 3 from its third occurrence on. Counting each distinct token once would never flip a row."""
    V = 8
    logits = torch.full((V,), -1.0)
    logits[3], logits[5] = 2.0, 0.8
    rows, batch, want = [], [], []
    for count in range(6):
        for penalty, repeated, filler in ((0.5, 3, 6), (-0.5, 5, 7)):
            output = [repeated, filler] * count + [filler]  # the filler occurs too: the counts are per token
            sp = SamplingParams(temperature=0, frequency_penalty=penalty)
            rows.append(logits)
            batch.append(SamplingRow(sp, None, [3, 3, 5, 5, 5], output))  # prompt occurrences do not count
            lead = 2.0 - 0.8 - 0.5 * count  # how far 3 stays ahead of 5
            want.append(3 if lead > 0 else 5)
    got = sample(torch.stack(rows), batch, eos_token_id=2).tolist()
    assert got == want
    assert want == [3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5]


def test_penalised_sampling_matches_the_processed_distribution():
    logits = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    prompt, output = [0, 3], [1, 1, 4]
    sp = SamplingParams(temperature=0.7, seed=21, repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    ref = reference_processed(sp, torch.tensor(logits), prompt, output, eos=5).tolist()
    expected = ref_probs(ref, temperature=0.7)
    sampler = RequestSampler(sp, prompt)
    sampler.output = output
    row = torch.tensor(logits)
    counts = Counter(sampler.sample(row) for _ in range(N_DRAWS))
    freq = [counts.get(i, 0) / N_DRAWS for i in range(len(logits))]
    assert max(abs(f - p) for f, p in zip(freq, expected, strict=True)) < 0.03, (freq, expected)


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    from transformers import MinPLogitsWarper

    logits = [math.log(p) for p in (0.5, 0.25, 0.12, 0.08, 0.05)]
    for min_p in (0.1, 0.2, 0.3):
        warped = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), torch.tensor([logits]))[0]
        expected = [0.0 if math.isinf(w) else p for w, p in zip(warped.tolist(), ref_probs(logits), strict=True)]
        total = sum(expected)
        expected = [p / total for p in expected]
        check_distribution(SamplingParams(temperature=1.0, min_p=min_p, seed=8), logits, expected)


def test_seeded_rows_draw_the_same_tokens_whatever_shares_the_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g)
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seed=100 + i) for i in range(6)]
    alone = []
    for i in range(6):
        gen = new_generator(params[i])
        alone.append(
            [
                int(sample(logits[i : i + 1], [SamplingRow(params[i], gen, [], [])], eos_token_id=2)[0])
                for _ in range(20)
            ]
        )
    gens = [new_generator(p) for p in params]
    together = [[] for _ in range(6)]
    for _ in range(20):
        toks = sample(logits, [SamplingRow(p, gg, [], []) for p, gg in zip(params, gens, strict=True)], eos_token_id=2)
        for i, t in enumerate(toks.tolist()):
            together[i].append(t)
    assert together == alone


@pytest.mark.parametrize("temperature", [1e-40, 1e-6, 9.9e-6])
def test_tiny_temperatures_are_greedy(temperature):
    row = torch.tensor([0.5, 3.0, 2.99, -1.0]) * 50
    sp = SamplingParams(temperature=temperature, seed=1)
    assert sp.greedy and new_generator(sp) is None
    assert [RequestSampler(sp).sample(row) for _ in range(20)] == [1] * 20
