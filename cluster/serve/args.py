"""Arguments of the Serve application (``build_app(args)``): the builder's :class:`~cluster.builder.ClusterConfig`
plus what only serving needs, validated so a bad deploy names the bad field."""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictInt, ValidationError, field_validator

from cluster.builder import ClusterConfig, describe
from cluster.errors import AppArgsError
from cluster.tiny_model import default_model_dir


class AppArgs(ClusterConfig):
    """What ``serve run`` / ``serve deploy`` pass as ``args`` (and ``mixserve serve`` builds from its flags)."""

    model: str | None = Field(None, description="checkpoint folder; None serves the built-in tiny model")  # type: ignore[assignment]
    expert_workers: StrictInt = Field(2, ge=0, description="expert-worker actors; 0 runs every expert in the frontend")
    api_key: str | None = Field(None, description="when set, /v1 requests need 'Authorization: Bearer <key>'")
    served_model_name: str = Field("mixserve-tiny", min_length=1, description="the model name clients use")
    request_timeout_s: float = Field(300.0, gt=0, description="a request that does not finish in time gets 408")

    @field_validator("transport")
    @classmethod
    def _object_refs_only(cls, v: str) -> str:
        if v != "object_ref":
            raise ValueError(
                "the Serve application moves tokens over object refs; RDT transports (gloo, nccl) are available "
                "in the offline LLM API"
            )
        return v

    def resolved_model(self) -> str:
        return self.model or str(default_model_dir())

    def cluster_config(self) -> ClusterConfig:
        """The builder's config: these arguments without the serving-only ones, the model folder resolved."""
        fields = {n: getattr(self, n) for n in ClusterConfig.model_fields if n != "model"}
        return ClusterConfig(model=self.resolved_model(), **fields)


def parse_args(args: dict[str, Any] | None) -> AppArgs:
    try:
        return AppArgs(**(args or {}))
    except ValidationError as e:
        raise AppArgsError(describe(e, "invalid mixserve application arguments")) from None
