"""Serve application arguments: bad values fail the deploy with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import LLM, SamplingParams
from cluster.errors import AppArgsError
from cluster.serve.args import parse_args
from cluster.tiny_model import TinyModelSpec, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_args_are_valid():
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    args = parse_args(config["applications"][0]["args"])
    assert args.expert_workers == 2 and args.model is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"expert_workers": -1}, "expert_workers"),
        ({"dtype": "int8"}, "dtype"),
        ({"placement_strategy": "EVERYWHERE"}, "placement_strategy"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens"),
        ({"served_model_name": ""}, "served_model_name"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"modle": "/x"}, "modle"),
        ({"transport": "gloo"}, "transport"),
    ],
)
def test_bad_args_name_the_field(args, needle):
    with pytest.raises(AppArgsError, match=needle):
        parse_args(args)


def test_offline_generate_takes_more_prompts_than_the_queue(tmp_path):
    folder = write_tiny_model(tmp_path, TinyModelSpec(hidden=32, intermediate=64, layers=1, experts=4))
    llm = LLM(folder, max_num_seqs=2, max_num_batched_tokens=16, max_queued_requests=1, progress=False)
    outs = llm.generate([[1, 5 + i] for i in range(7)], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [3] * 7
