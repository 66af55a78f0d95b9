"""W = 0 parity on quantized checkpoints (float32, CPU): ``LLM.logits`` against an independent reference, and greedy
tokens that follow it wherever its top-2 margin is clear.

The reference, per format:
- compressed-tensors w4a16 (group 32), w8a16 (channel), fp8 (per tensor, static input scale) and fp8-dynamic (per
  channel): transformers' own loading of the checkpoint (``CompressedTensorsConfig(dequantize=True)``, float32);
- compressed-tensors w4a16 with zero points and naive-quantized w8a8, which transformers 5 cannot dequantize for
  Mixtral's fused experts (it drops the zero points / finds no tensors): a transformers model of compressed-tensors'
  own decompression;
- AutoFP8, GPTQ (desc_act false / true, 8-bit asymmetric), AWQ: a transformers model of the exact float32
  dequantization of the numbers the writer stored.
The scales are bfloat16 or float16 numbers (what checkpoints store; the fused CPU kernel holds them exactly), the
compressed-tensors ones stored in float32, so transformers' dequantization (in the scales' dtype) is exact too.
"""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from tests import quant_checkpoints as qc
from tests.helpers import LOGITS_TOL, assert_greedy_follows, hf_logits, hf_mixtral

CASES = {
    # name -> (weights seed, writer, reference: "transformers" or "dense")
    "ct-w4a16": (201, lambda f: qc.write_compressed(f, "w4a16"), "transformers"),
    "ct-w8a16": (202, lambda f: qc.write_compressed(f, "w8a16"), "transformers"),
    "ct-fp8": (203, lambda f: qc.write_compressed(f, "fp8"), "transformers"),
    "ct-fp8-dynamic": (204, lambda f: qc.write_compressed(f, "fp8-dynamic"), "transformers"),
    "ct-w4a16-asym": (205, lambda f: qc.write_compressed(f, "w4a16-asym"), "dense"),
    "ct-w8a8-naive": (206, lambda f: qc.write_compressed(f, "w8a8-naive"), "dense"),
    "autofp8": (207, lambda f: qc.write_autofp8(f), "dense"),
    "gptq": (208, lambda f: qc.write_gptq(f), "dense"),
    "gptq-desc-act": (209, lambda f: qc.write_gptq(f, desc_act=True), "dense"),
    "gptq-8bit-asym": (210, lambda f: qc.write_gptq(f, bits=8, sym=False), "dense"),
    "awq": (211, lambda f: qc.write_awq(f), "dense"),
}
PROMPT = [1, 415, 2936, 9060, 285, 1142, 10575, 754, 272, 17898, 3914, 28723, 330, 1000]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    seed, writer, kind = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf_mixtral(folder, seed=seed, sliding_window=8)
    dequantized = writer(folder)
    if kind == "transformers":
        ref = qc.transformers_dequantized(folder)
    else:
        ref = qc.dense_reference(folder, dequantized, tmp_path_factory.mktemp(request.param + "-ref"))
    llm = LLM(folder, expert_workers=0, dtype="float32", progress=False, attention_backend="sdpa")
    yield request.param, ref, llm
    llm.shutdown()


def test_logits_match_the_reference(case):
    name, ref, llm = case
    ids = PROMPT + list(range(2000, 2020))  # longer than the sliding window
    ours = llm.logits(ids)
    assert (ours - hf_logits(ref, ids)).abs().max().item() < LOGITS_TOL["float32"], name


def test_greedy_tokens_follow_the_reference(case):
    name, ref, llm = case
    out = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 24
    assert_greedy_follows(ref, PROMPT, out.token_ids, margin=2 * LOGITS_TOL["float32"])


def test_placement_reports_the_stored_bytes(case):
    name, _, llm = case
    (entry,) = llm.placement()
    config = llm.apply_model(lambda model: model.config)
    float32_bytes = config.num_layers * config.num_experts * config.expert_param_count() * 4
    # int4 ~ 0.16-0.2x, int8 / fp8 per channel ~ 0.27x, int8 in groups of 32 (a float32 scale and zero each) 0.31x
    assert 0 < entry["expert_bytes"] < 0.32 * float32_bytes, name


def test_the_frontend_keeps_attention_as_stored(case):
    """Attention's projections stay in the checkpoint's form on the frontend (no dense copy): each listed as
    ``kind: kernel``, in at most a third of their float32 bytes (0.19-0.31x here; the logits above come from them)."""
    name, _, llm = case
    forms = llm.frontend_info()["attention_weights"]
    assert forms and all(f.split()[0].rstrip(":") in ("int4", "int8", "fp8") for f in forms), (name, forms)
    held, weights = llm.apply_model(
        lambda model: (
            sum(p.nbytes() for p in model.projections().values()),
            sum(p.numel() for p in model.projections().values()),
        )
    )
    assert held < 0.34 * 4 * weights, name
