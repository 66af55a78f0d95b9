"""The engine's limits, declared once (the builder's config, the CLI and the Serve arguments extend this model)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from cluster.errors import SetupError


class EngineConfig(BaseModel):
    """Scheduler limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: StrictInt = Field(16, ge=1, description="sequences decoded together (= KV-cache slots)")
    max_num_batched_tokens: StrictInt = Field(
        512, ge=1, description="tokens per step: decode tokens + prefill chunks (long prompts are chunked)"
    )
    max_queued_requests: StrictInt = Field(
        256, ge=1, description="requests waiting for a slot before new ones are refused as overload"
    )
    block_size: StrictInt = Field(16, ge=1, le=1024, description="positions per KV-cache block")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of prompt prefixes that earlier requests computed"
    )
    max_model_len: StrictInt | None = Field(
        None, ge=2, description="prompt + max_tokens limit; default: the model's max_position_embeddings, at most 8192"
    )

    @model_validator(mode="after")
    def _every_running_sequence_can_decode(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step"
            )
        return self

    def engine_config(self) -> EngineConfig:
        """Just the engine's fields (for configs that extend this one)."""
        return EngineConfig(**{name: getattr(self, name) for name in EngineConfig.model_fields})

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        if self.max_model_len is None:
            return min(max_position_embeddings, 8192)
        if self.max_model_len > max_position_embeddings:
            raise SetupError(
                f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                f"({max_position_embeddings})"
            )
        return self.max_model_len
