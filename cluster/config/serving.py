"""The Serve application's configuration (``build_app(args)``, ``serve run`` / ``serve deploy`` ``args``, the flags
of ``mixserve serve``): the cluster's four parts plus a serving part, composed, named flat, validated so that a bad
deploy names the bad field. No torch and no Ray here: the ingress reads it too."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from cluster.config.cluster import ClusterConfig, Composed
from cluster.config.engine import CacheConfig, EngineConfig
from cluster.config.load import LoadConfig
from cluster.config.parallel import ParallelConfig
from cluster.config.transports import NAMES, SERVE_NAMES, spec_of
from cluster.errors import AppArgsError

NonEmpty = Annotated[str, Field(min_length=1)]
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of a deployment's replicas (its ``autoscaling_config``, these fields of it): between
    ``min_replicas`` and ``max_replicas``, aiming at ``target_ongoing_requests`` per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: StrictInt = Field(1, ge=0)
    max_replicas: StrictInt = Field(1, ge=1)
    initial_replicas: StrictInt | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class ServingConfig(BaseModel):
    """What only serving needs: who may call, under which names, how long a request may take, how large it may be."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    frontend_replicas: StrictInt = Field(
        1,
        ge=1,
        description="frontend replicas (attention, KV cache, engine), all over ONE shared expert pool; "
        "frontend_autoscaling, when given, decides instead",
    )
    frontend_autoscaling: Autoscaling | None = Field(
        None, description="Serve autoscaling of the frontend replicas (min_replicas, max_replicas, ...)"
    )
    ingress_replicas: StrictInt = Field(1, ge=1, description="ingress replicas (HTTP, gRPC, tokenizing)")
    ingress_autoscaling: Autoscaling | None = Field(None, description="Serve autoscaling of the ingress replicas")

    @property
    def max_frontends(self) -> int:
        """The most frontend replicas this app may run at once."""
        a = self.frontend_autoscaling
        return a.max_replicas if a is not None else self.frontend_replicas

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


class AppArgs(Composed):
    """What ``serve run`` / ``serve deploy`` pass as ``args`` (and ``mixserve serve`` builds from its flags): the
    cluster's parts and the serving part. Unlike the offline API it runs 2 expert workers unless told otherwise,
    and only over the transports the registry allows in Serve."""

    DEFAULTS = {"expert_workers": 2}
    ERROR = AppArgsError
    WHAT = "mixserve application arguments"

    load: LoadConfig = LoadConfig.model_validate({})
    engine: EngineConfig = EngineConfig.model_validate({})
    cache: CacheConfig = CacheConfig.model_validate({})
    parallel: ParallelConfig = ParallelConfig.model_validate({})
    serving: ServingConfig = ServingConfig.model_validate({})

    @classmethod
    def check_parts(cls, parts: dict[str, Any]) -> list[str]:
        parallel, serving = parts["parallel"], parts["serving"]
        spec = spec_of(parallel.transport)
        if not spec.serve:
            served = ", ".join(SERVE_NAMES)
            return [f"transport: {spec.name} is not available in Serve ({served} are): {spec.why_not_serve}"]
        if serving.max_frontends > 1 and parallel.expert_workers > 0 and not spec.shared_pool:
            shared = ", ".join(n for n in NAMES if spec_of(n).shared_pool)
            return [
                f"transport: {spec.name} cannot serve several frontends from one expert pool ({shared} can): "
                f"{spec.why_not_shared}"
            ]
        return []

    @property
    def model_name(self) -> str:
        """The name responses report: the first served model name."""
        return self.serving.served_model_name[0]

    def cluster_config(self) -> ClusterConfig:
        """The frontend's config: the cluster's parts of these arguments (the model not resolved yet)."""
        return ClusterConfig(load=self.load, engine=self.engine, cache=self.cache, parallel=self.parallel)


def parse_args(args: dict[str, Any] | None) -> AppArgs:
    """Validated arguments; a bad one is an :class:`AppArgsError` naming it."""
    return AppArgs.from_options(args or {})
