"""The engine's part of the cluster config (scheduler limits, the KV block unit, prefix caching) and the cache's part
(how many KV blocks the frontend allocates)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from cluster.errors import SetupError


class EngineConfig(BaseModel):
    """What the engine reads: scheduler limits, the KV block size it allocates in, prefix caching."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: StrictInt = Field(
        16,
        ge=1,
        description="sequences running at once (decoded together in one step); the KV blocks they hold are sized by "
        "the cache part (num_kv_blocks / kv_cache_memory_gb)",
    )
    max_num_batched_tokens: StrictInt = Field(
        512, ge=1, description="tokens per step: decode tokens + prefill chunks (long prompts are chunked)"
    )
    max_queued_requests: StrictInt = Field(
        256, ge=1, description="requests waiting to run (beyond max_num_seqs) before new ones are refused as overload"
    )
    block_size: StrictInt = Field(16, ge=1, le=1024, description="positions per KV-cache block")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of prompt prefixes that earlier requests computed"
    )
    enable_return_routed_experts: bool = Field(
        False,
        description="report every request's routed experts per token and layer (as if each asked for "
        "return_routed_experts)",
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

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        if self.max_model_len is None:
            return min(max_position_embeddings, 8192)
        if self.max_model_len > max_position_embeddings:
            raise SetupError(
                f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                f"({max_position_embeddings})"
            )
        return self.max_model_len


class CacheConfig(BaseModel):
    """The frontend's KV-cache pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_kv_blocks: StrictInt | None = Field(
        None,
        ge=1,
        description="KV-cache blocks; None: from kv_cache_memory_gb, else room for max_num_seqs full sequences",
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="KV-cache size in GiB (ignored with num_kv_blocks)"
    )
