"""How the experts are spread: expert workers, copies of experts, the transport (from the registry,
:mod:`cluster.config.transports`), placement and the resources each actor asks Ray for. The parallel part of
:class:`~cluster.config.cluster.ClusterConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from cluster.config.transports import NAMES, spec_of

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class ParallelConfig(BaseModel):
    """Expert workers and how tokens reach them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_workers: StrictInt = Field(0, ge=0, description="expert-worker actors; 0 runs every expert in the frontend")
    transport: str = Field(
        "object_ref",
        description="how tokens travel to the workers: "
        + "; ".join(f"{spec.name}: {spec.summary}" for spec in map(spec_of, NAMES)),
        json_schema_extra={"choices": list(NAMES)},
    )
    expert_replicas: StrictInt = Field(
        1,
        ge=1,
        description="copies of every expert, each on a different worker (and node when possible): with 2, a dead "
        "worker fails no request. Costs R times the expert memory; needs a transport that supports copies",
    )
    overlap_min_batch: StrictInt | None = Field(
        None,
        ge=0,
        description="steps of at least this many tokens run as two micro-batches in flight (expert workers only); "
        "0: off; None: 256 with GPU workers, off with CPU workers (measured slower there)",
    )
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 when the cluster has enough GPUs, else 0")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each expert worker asks Ray for; its torch threads: that count rounded down"
    )
    frontend_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs the frontend asks Ray for (offline actor or Serve replica); its torch threads follow",
    )
    placement_strategy: Strategy = Field("PACK", description="Ray placement-group strategy for the workers")
    expert_placement: tuple[tuple[int, ...], ...] | None = Field(
        None, description="[layer][expert] -> worker; None places contiguous blocks"
    )
    worker_timeout_s: float = Field(60.0, gt=0, description="an expert worker that does not answer a layer fails")
    expert_pool: str | None = Field(
        None,
        description="a shared expert pool to attach to, by name: offline, the pool actor of that name (started, and "
        "owned by this LLM, when none runs); in Serve, the Serve application that holds it (built by "
        "cluster.serve.app:build_pool_app), which then outlives this application's redeploys. None: offline, this "
        "LLM's own workers; in Serve, the application's own ExpertPool deployment",
    )

    @field_validator("placement_strategy", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("transport")
    @classmethod
    def _known(cls, v: str) -> str:
        spec_of(v)  # ValueError naming the known transports
        return v

    @field_validator("expert_pool")
    @classmethod
    def _shareable(cls, v: str | None, info: ValidationInfo) -> str | None:
        transport = info.data.get("transport")
        if v is not None and info.data.get("expert_workers") == 0:
            raise ValueError("a shared expert pool needs expert_workers >= 1 (the pool's workers)")
        if v is not None and transport is not None and not spec_of(transport).shared_pool:
            able = ", ".join(n for n in NAMES if spec_of(n).shared_pool)
            raise ValueError(
                f"a shared expert pool needs a transport that can share workers ({able}); {transport}: "
                f"{spec_of(transport).why_not_shared}"
            )
        return v

    @field_validator("expert_replicas")
    @classmethod
    def _copies(cls, r: int, info: ValidationInfo) -> int:
        """Checked against the fields declared before it (expert_workers, transport)."""
        w, transport = info.data.get("expert_workers"), info.data.get("transport")
        if r > 1 and w is not None and r > w:
            raise ValueError(
                f"{r} copies of every expert need at least {r} expert_workers (got {w}): the copies of an expert "
                "live on distinct workers"
            )
        if r > 1 and transport is not None and not spec_of(transport).copies:
            able = ", ".join(n for n in NAMES if spec_of(n).copies)
            raise ValueError(
                f"copies of experts need a transport that supports them ({able}); {transport}: "
                f"{spec_of(transport).why_no_copies}"
            )
        return r
