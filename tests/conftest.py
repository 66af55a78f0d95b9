"""Shared fixtures. One local Ray instance serves every test that can share it (started on first use)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ensure_local_ray

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``gpu``-marked test when torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(params=[True, False], ids=["fast-bf16", "no-fast-bf16"])
def fast_bf16(request, monkeypatch) -> bool:
    """The test runs twice: once as on a CPU with bf16 units, once as on one without (``cpu_has_fast_bf16`` forced
    through $MIXSERVE_CPU_FAST_BF16), so what ``dtype="auto"`` picks never depends on the machine running the tests."""
    from cluster.config.dtype import FAST_BF16_ENV

    monkeypatch.setenv(FAST_BF16_ENV, "1" if request.param else "0")
    return request.param


@pytest.fixture(params=["auto", "avx2", "portable", "off"])
def cpu_kernel_mode(request, monkeypatch) -> str:
    """The test runs with each build of the fused CPU kernel ($MIXSERVE_CPU_KERNEL): this CPU's (AVX-512 where it has
    it, else AVX2), the AVX2 one, the portable C loop a CPU without either runs, and none (torch's kernels and the
    dequantize path)."""
    from workers.quant.cpu_kernel import ENV

    monkeypatch.setenv(ENV, request.param)
    return request.param


@pytest.fixture(scope="session")
def ray_local():
    ray = ensure_local_ray()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture()
def ray_instance(ray_local):
    """The shared instance, restarted if a test that needed its own cluster shut it down."""
    return ensure_local_ray()
