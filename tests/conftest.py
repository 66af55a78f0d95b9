"""Shared fixtures. One local Ray instance serves every test that can share it (started on first use)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RAY_CPUS = 16  # logical CPUs: more actors than the 2 physical cores, as in CI
RAY_GPUS = 4  # logical GPUs so placement across GPUs is testable on a CPU machine


def ensure_local_ray():
    import ray

    from cluster.serve.grpc_bind import GRPC_HOST_ENV, HOOK

    if not ray.is_initialized():
        ray.init(
            address="local",  # a new instance even if a `ray start` cluster runs on this machine
            num_cpus=RAY_CPUS,
            num_gpus=RAY_GPUS,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            # as `mixserve serve` starts Ray: Serve's gRPC proxy binds 127.0.0.1, not every interface
            runtime_env={"worker_process_setup_hook": HOOK, "env_vars": {GRPC_HOST_ENV: "127.0.0.1"}},
        )
    return ray


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``gpu``-marked test when torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # here, not at the top: a run that collects no gpu test does not pay for importing torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)


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
