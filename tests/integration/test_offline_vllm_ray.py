"""The vLLM-shaped offline API on a sharded model (W = 2, the frontend in its own actor): one RequestOutput per prompt
with its n choices, the same tokens as the in-process reference, and a progress bar fed from the frontend actor as
prompts finish."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model

pytestmark = pytest.mark.ray
PROMPTS = [[1, 5, 6, 7], [1, 330, 1000], "Hello there", {"prompt_token_ids": [1, 2000, 3000, 4000, 5000]}]


class _Bar:
    """A tqdm stand-in that records what the bar is told."""

    made: list[_Bar] = []

    def __init__(self, *, total: int, **kwargs) -> None:
        self.total, self.n, self.closed = total, 0, False
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_sharded_generate_has_vllms_shape_and_a_progress_bar(ray_instance, tmp_path):
    folder = write_tiny_model(tmp_path, TinyModelSpec(hidden=32, intermediate=64, layers=2, experts=4))
    params = SamplingParams(n=2, max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)
    with LLM(folder, progress=False) as local:
        want = local.generate(PROMPTS, params, use_tqdm=False)
    with LLM(folder, expert_workers=2, gpus_per_worker=0, progress=False) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=_Bar)
    (bar,) = _Bar.made
    assert (bar.total, bar.n, bar.closed) == (4, 4, True)
    assert [o.prompt for o in outs] == [None, None, "Hello there", None]
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in want]
    for o, w in zip(outs, want, strict=True):
        assert [c.cumulative_logprob for c in o.outputs] == pytest.approx(
            [c.cumulative_logprob for c in w.outputs], abs=1e-4
        )
