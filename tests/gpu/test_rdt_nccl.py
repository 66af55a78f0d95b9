"""Expert workers over Ray Direct Transport with NCCL, on real GPUs: the same greedy tokens as W = 0.

Needs three GPUs: one for the frontend actor and one per expert worker (NCCL ranks must not share a GPU), and Ray:
the whole module is skipped where Ray is not installed (the lent GPU box of ``make gpu-check`` has none).
"""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.helpers import hf_mixtral

ray = pytest.importorskip("ray", reason="needs Ray (NCCL expert workers); not installed here")

pytestmark = [pytest.mark.gpu, pytest.mark.ray]

PROMPTS = [[1, 415, 2936, 9060, 285, 1142], [1, 330, 1000, 2000, 77, 8, 9, 10, 11, 12, 13], [1, 5]]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
LOGIT_IDS = PROMPTS[1] + list(range(3000, 3020))
# W = 0 and W = 2 run the same bf16 arithmetic; only the expert GEMMs run in other processes (possibly with other
# cuBLAS kernel choices), so logits may differ by a few bf16 rounding steps: at |logit| <= 1 one step is 2**-8.
LOGIT_ATOL = 5 * 2**-8


@pytest.fixture(scope="module")
def ray_real_gpus():
    """A Ray instance that advertises the GPUs this machine really has.

    The shared test instance (tests/conftest.py) advertises 4 logical GPUs so placement is testable on a CPU
    machine; NCCL needs real ones, so that instance is stopped here (``ray_instance`` restarts it for later tests).
    """
    visible = torch.cuda.device_count()
    if visible < 3:
        pytest.skip(f"needs 3 GPUs (a frontend and 2 expert workers, one NCCL rank per GPU); {visible} visible")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.cluster_resources().get("GPU", 0) == visible
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nccl")
    hf_mixtral(folder, seed=11, num_local_experts=8, num_experts_per_tok=2, sliding_window=12)
    return folder


@pytest.fixture(scope="module")
def in_process(ckpt):
    """W = 0 on this process's GPU: the reference, freed before the workers start."""
    with LLM(ckpt, expert_workers=0, dtype="bfloat16", device="cuda", progress=False) as llm:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        logits = llm.logits(LOGIT_IDS).float().cpu()
    torch.cuda.empty_cache()
    return tokens, logits


def test_nccl_workers_match_in_process(ray_real_gpus, ckpt, in_process):
    ref_tokens, ref_logits = in_process
    with LLM(ckpt, expert_workers=2, transport="nccl", dtype="bfloat16", progress=False) as llm:
        placement = llm.placement()
        assert len(placement) == 2
        gpus = [tuple(p["gpu_ids"]) for p in placement]
        assert all(gpus) and len(set(gpus)) == 2, f"each worker needs its own GPU for NCCL: {gpus}"
        assert llm.frontend_info()["expert_bytes"] == 0  # every expert really runs in the workers

        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert tokens == ref_tokens
        logits = llm.logits(LOGIT_IDS).float().cpu()
        assert logits.shape == ref_logits.shape
        assert (logits - ref_logits).abs().max().item() <= LOGIT_ATOL
