"""Arguments of the Serve application (``build_app(args)``), validated so a bad deploy names the bad field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.placement import STRATEGIES


class AppArgs(BaseModel):
    """What ``serve run`` / ``serve deploy`` pass as ``args`` (and ``mixserve serve`` builds from its flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="checkpoint folder; None serves the built-in tiny model")
    expert_workers: int = Field(2, ge=0, description="expert-worker actors; 0 runs experts inside the frontend")
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 when the cluster has enough GPUs, else 0")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_num_seqs: int = Field(16, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    max_queued_requests: int = Field(256, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    api_key: str | None = Field(None, description="when set, /v1 requests need 'Authorization: Bearer <key>'")
    served_model_name: str = Field("mixserve-tiny", min_length=1)
    request_timeout_s: float = Field(300.0, gt=0)
    attention_backend: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"

    @field_validator("placement_strategy", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.placement_strategy not in STRATEGIES:  # pragma: no cover - Literal already checks
            raise ValueError(f"placement_strategy must be one of {STRATEGIES}")
        return self

    def resolved_model(self) -> str:
        from cluster.tiny_model import default_model_dir

        return self.model or str(default_model_dir())
