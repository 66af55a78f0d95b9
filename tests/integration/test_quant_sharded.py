"""Quantized experts on Ray workers (W = 2, object refs and channels): the logits and greedy tokens of W = 0's
references (tests/unit/test_quant_parity.py says which, per format), each worker holding its experts quantized and
reporting their bytes; a worker's resident memory grows by its stored expert bytes, not the dense ones."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.config.model import ModelConfig
from tests import quant_checkpoints as qc
from tests.helpers import LOGITS_TOL, assert_greedy_follows, hf_logits, hf_mixtral

pytestmark = pytest.mark.ray

FORMATS = {
    # name -> (weights seed, writer, reference: "transformers" or "dense")
    "ct-w4a16": (301, lambda f: qc.write_compressed(f, "w4a16"), "transformers"),
    "ct-w8a16": (302, lambda f: qc.write_compressed(f, "w8a16"), "transformers"),
    "ct-fp8": (303, lambda f: qc.write_compressed(f, "fp8"), "transformers"),
    "autofp8": (304, lambda f: qc.write_autofp8(f), "dense"),
    "gptq": (305, lambda f: qc.write_gptq(f), "dense"),
    "gptq-desc-act": (306, lambda f: qc.write_gptq(f, desc_act=True), "dense"),
    "awq": (307, lambda f: qc.write_awq(f), "dense"),
}
PROMPT = [1, 415, 2936, 9060, 285, 1142, 10575, 754, 272, 17898]


# every format over object refs and over channels (the same worker code behind another wire)
CASES = [(name, transport) for name in FORMATS for transport in ("object_ref", "channel")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (name, folder, reference), each written on first use."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            seed, writer, kind = FORMATS[name]
            folder = tmp_path_factory.mktemp(name)
            hf_mixtral(folder, seed=seed, num_local_experts=8)
            dequantized = writer(folder)
            if kind == "transformers":
                ref = qc.transformers_dequantized(folder)
            else:
                ref = qc.dense_reference(folder, dequantized, tmp_path_factory.mktemp(name + "-ref"))
            made[name] = (name, folder, ref)
        return made[name]

    return get


@pytest.mark.parametrize(("fmt", "transport"), CASES)
def test_two_workers_match_the_reference(ray_instance, checkpoints, fmt, transport):
    name, folder, ref = checkpoints(fmt)
    ids = PROMPT + list(range(3000, 3012))
    with LLM(folder, expert_workers=2, transport=transport, dtype="float32", progress=False) as llm:
        assert (llm.logits(ids) - hf_logits(ref, ids)).abs().max().item() < LOGITS_TOL["float32"], name
        out = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
        assert_greedy_follows(ref, PROMPT, out.token_ids, margin=2 * LOGITS_TOL["float32"])
        placement = llm.placement()
        config = ModelConfig.from_dir(folder)
        float32_expert = config.expert_param_count() * 4
        for worker in placement:
            assert 0 < worker["expert_bytes"] < 0.32 * float32_expert * len(worker["experts"]), name
            assert "dense" not in worker["expert_format"]
        assert llm.frontend_info()["expert_bytes"] == 0
        health = llm.health()
        assert health["ok"] and [w["expert_bytes"] for w in health["workers"]] == [p["expert_bytes"] for p in placement]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A bfloat16 checkpoint whose experts are big enough to see in a process's memory (64 experts of 3 x 512 x
    1792: 352 MiB in bfloat16)."""
    folder = tmp_path_factory.mktemp("wide")
    spec = TinyModelSpec(layers=8, hidden=512, intermediate=1792, heads=8, kv_heads=4, experts=8, vocab=1000)
    return write_tiny_model(folder, spec, dtype=torch.bfloat16)


@pytest.mark.parametrize(("kind", "ratio"), [("int4", 0.30), ("int8", 0.55)])
def test_worker_memory_grows_by_the_stored_bytes(ray_instance, wide, kind, ratio):
    """One worker holds every expert, quantized on load: the memory it allocated (RssAnon: its RSS without the
    pages of the libraries it maps, which grow by ~10 MB as kernels first run) after loading and one generation,
    minus the same before loading (the same process with torch and mixserve imported), is within 15% of the bytes it
    stores, and those are at most ``ratio`` x the bfloat16 bytes."""
    config = ModelConfig.from_dir(wide)
    bf16 = config.num_layers * config.num_experts * config.expert_param_count() * 2
    with LLM(wide, expert_workers=1, dtype="bfloat16", quantization=kind, progress=False) as llm:
        llm.generate([[1, 5, 9, 13]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        (worker,) = llm.placement()
    stored = worker["expert_bytes"]
    assert stored <= ratio * bf16
    grown = worker["anon_rss_bytes"] - worker["anon_rss_before_load"]
    assert abs(grown - stored) <= 0.15 * stored, (grown / 2**20, stored / 2**20)
