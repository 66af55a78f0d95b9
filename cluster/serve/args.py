"""Arguments of the Serve application (``build_app(args)``): the builder's :class:`~cluster.builder.ClusterConfig`
plus what only serving needs, validated so a bad deploy names the bad field."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StrictInt, ValidationError, field_validator

from cluster.builder import ClusterConfig, describe, model_folder
from cluster.errors import AppArgsError
from cluster.tiny_model import default_model_dir

NonEmpty = Annotated[str, Field(min_length=1)]
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class AppArgs(ClusterConfig):
    """What ``serve run`` / ``serve deploy`` pass as ``args`` (and ``mixserve serve`` builds from its flags)."""

    model: str | None = Field(None, description="checkpoint folder; None serves the built-in tiny model")  # type: ignore[assignment]
    expert_workers: StrictInt = Field(2, ge=0, description="expert-worker actors; 0 runs every expert in the frontend")
    api_key: list[NonEmpty] = Field(
        default_factory=list,
        description="API keys (repeatable); with any key configured, /v1/*, /tokenize, /detokenize and gRPC need "
        "'Authorization: Bearer <key>'. Prefer api_key_env / api_key_file: args show in Ray's Serve config",
    )
    api_key_env: str | None = Field(
        "MIXSERVE_API_KEY", description="environment variable holding comma-separated API keys (none: do not read one)"
    )
    api_key_file: str | None = Field(
        None, description="file with one API key per line (e.g. a mounted Kubernetes Secret); re-read when it changes"
    )
    served_model_name: list[NonEmpty] = Field(
        default_factory=lambda: ["mixserve-tiny"],
        min_length=1,
        description="model names clients may use (repeatable); responses report the first",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="a request that does not finish in time gets 408")
    max_request_bytes: StrictInt = Field(
        DEFAULT_MAX_REQUEST_BYTES, ge=1024, description="largest HTTP request body / gRPC message; larger gets 413"
    )
    cors_allowed_origins: list[NonEmpty] = Field(
        default_factory=list, description="origins allowed by CORS (repeatable; '*' for any); none: CORS off"
    )

    @field_validator("transport")
    @classmethod
    def _no_rdt(cls, v: str) -> str:
        if v not in ("object_ref", "channel"):
            raise ValueError(
                "the Serve application moves tokens over object refs or channels; RDT transports (gloo, nccl) are "
                "available in the offline LLM API"
            )
        return v

    @field_validator("api_key", "served_model_name", "cors_allowed_origins", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        """A single string (as the YAML files and older configs write it) is a list of one; null is none."""
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("api_key")
    @classmethod
    def _unpadded(cls, v: list[str]) -> list[str]:
        if any(k != k.strip() or any(c.isspace() for c in k) for k in v):
            raise ValueError("an API key must not contain whitespace")
        return v

    @property
    def model_name(self) -> str:
        """The name responses report: the first served model name."""
        return self.served_model_name[0]

    def resolved_model(self) -> str:
        """The checkpoint folder: the model given (a Hugging Face id from the local cache), else the built-in one."""
        return model_folder(self.model, download=self.download) if self.model else str(default_model_dir())

    def cluster_config(self) -> ClusterConfig:
        """The builder's config: these arguments without the serving-only ones, the model folder resolved."""
        fields = {n: getattr(self, n) for n in ClusterConfig.model_fields if n != "model"}
        return ClusterConfig.create(model=self.resolved_model(), **fields)


def parse_args(args: dict[str, Any] | None) -> AppArgs:
    try:
        return AppArgs(**(args or {}))
    except ValidationError as e:
        raise AppArgsError(describe(e, "invalid mixserve application arguments")) from None
