"""The one place that assembles a frontend: config -> tokenizer, model, expert client, runner, engine.

:class:`ClusterConfig` is the single typed configuration (engine limits, dtype, transport, resources); the offline
``LLM``, the Serve frontend deployment, the CLI flags (``cluster.options``) and the benchmarks all start from it.
:func:`build_frontend` builds what a frontend process holds, with the experts either loaded in-process (W = 0,
the reference path) or reached through an expert client over Ray (``cluster.cluster`` builds that client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, StrictInt, ValidationError, field_validator

from cluster.checkpoint import parse_dtype
from cluster.config import ModelConfig
from cluster.engine import EngineConfig, EngineCore
from cluster.errors import SetupError
from cluster.grammar import LLGuidanceGrammars
from cluster.placement import ExpertPlacement
from cluster.tokenizer import Tokenizer
from router.client import ExpertClient, LocalExperts
from workers.attention import Attention, select_attention_backend
from workers.expert import ExpertShard
from workers.model import MixtralModel
from workers.runner import ModelRunner

Dtype = Literal["float32", "bfloat16", "float16"]
Transport = Literal["object_ref", "gloo", "nccl"]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
AttentionBackend = Literal["auto", "sdpa", "eager", "flash_attention_2"]


class ClusterConfig(EngineConfig):
    """Everything needed to build a serving frontend and its expert workers (plus the engine limits)."""

    model: str = Field(description="checkpoint folder (config.json or params.json, safetensors, tokenizer)")
    dtype: Dtype = Field("float32", description="weights and activations")
    expert_workers: StrictInt = Field(0, ge=0, description="expert-worker actors; 0 runs every expert in the frontend")
    transport: Transport = Field("object_ref", description="how tokens travel to the workers (gloo/nccl: RDT)")
    gpus_per_worker: float | None = Field(None, ge=0, description="None: 1 when the cluster has enough GPUs, else 0")
    placement_strategy: Strategy = Field("PACK", description="Ray placement-group strategy for the workers")
    expert_placement: tuple[tuple[int, ...], ...] | None = Field(
        None, description="[layer][expert] -> worker; None places contiguous blocks"
    )
    attention_backend: AttentionBackend = Field("auto", description="auto: flash-attention-2 when usable, else sdpa")
    device: str | None = Field(None, description="frontend device; None: cuda when available, else cpu")
    tokenizer: str | None = Field(None, description="tokenizer file or folder; None: the checkpoint's own")
    num_kv_blocks: StrictInt | None = Field(
        None,
        ge=1,
        description="KV-cache blocks; None: from kv_cache_memory_gb, else room for max_num_seqs full sequences",
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="KV-cache size in GiB (ignored with num_kv_blocks)"
    )
    worker_timeout_s: float = Field(60.0, gt=0, description="an expert worker that does not answer a layer fails")

    @field_validator("placement_strategy", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @classmethod
    def create(cls, **kwargs: Any) -> ClusterConfig:
        """Like the constructor, but a bad value is a :class:`SetupError` naming the field."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise SetupError(describe(e, f"invalid {cls.__name__}")) from None

    def placement(self, config: ModelConfig) -> ExpertPlacement:
        if self.expert_placement is None:
            return ExpertPlacement.contiguous(
                num_layers=config.num_layers, num_experts=config.num_experts, num_workers=self.expert_workers
            )
        return ExpertPlacement.from_map(
            self.expert_placement,
            num_layers=config.num_layers,
            num_experts=config.num_experts,
            num_workers=self.expert_workers,
        )


def describe(e: ValidationError, what: str) -> str:
    """One line naming every bad field: ``what: field: problem; field: problem``."""
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in e.errors())
    return f"{what}: {problems}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Frontend:
    """What a frontend process holds: tokenizer, non-expert model, KV cache (in the runner) and the engine."""

    config: ClusterConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    model: MixtralModel
    runner: ModelRunner
    core: EngineCore
    device: str
    local_expert_bytes: int

    @property
    def experts(self) -> ExpertClient:
        return self.model.experts

    def info(self) -> dict:
        return {
            "model": self.config.model,
            "device": self.device,
            "attention_backend": self.model.attention.backend,
            "frontend_bytes": self.model.nbytes(),
            "expert_bytes": self.local_expert_bytes,
            "kv_cache_bytes": self.runner.kv.nbytes(),
            "kv_blocks": self.runner.num_blocks,
            "kv_blocks_used": self.core.kv_blocks_used,
            "block_size": self.runner.block_size,
            "max_model_len": self.core.max_model_len,
            "engine": self.core.stats(),
        }

    def expert_load(self) -> list[list[int]]:
        return self.model.expert_load.snapshot()


def local_experts(config: ClusterConfig, model_config: ModelConfig, *, device: str, progress: bool) -> LocalExperts:
    """Every expert in this process, served as one local worker (W = 0)."""
    pairs = [(i, e) for i in range(model_config.num_layers) for e in range(model_config.num_experts)]
    shard = ExpertShard.load(
        config.model, model_config, pairs, dtype=config.dtype, device=device, progress=progress, label="experts"
    )
    placement = ExpertPlacement.contiguous(
        num_layers=model_config.num_layers, num_experts=model_config.num_experts, num_workers=1
    )
    return LocalExperts(placement, {0: shard})


def kv_blocks(config: ClusterConfig, model_config: ModelConfig, *, max_model_len: int) -> int:
    """Blocks in the KV pool: ``num_kv_blocks``, else what ``kv_cache_memory_gb`` holds, else enough for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens (a sliding window bounds what one sequence holds)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    bs = config.block_size
    if config.kv_cache_memory_gb is not None:
        per_block = 2 * model_config.num_layers * bs * model_config.num_kv_heads * model_config.head_dim
        per_block *= torch.empty((), dtype=parse_dtype(config.dtype)).element_size()
        return max(1, int(config.kv_cache_memory_gb * 2**30 // per_block))
    span = max_model_len
    if model_config.sliding_window is not None:
        span = min(span, model_config.sliding_window + config.max_num_batched_tokens + bs)
    return config.max_num_seqs * -(-span // bs)


def build_frontend(config: ClusterConfig, *, experts: ExpertClient | None = None, progress: bool = True) -> Frontend:
    """Tokenizer, non-expert weights, KV cache and engine; ``experts`` None loads every expert here (W = 0)."""
    model_config = ModelConfig.from_dir(config.model)
    device = config.device or default_device()
    local_bytes = 0
    if experts is None:
        local = local_experts(config, model_config, device=device, progress=progress)
        local_bytes = sum(s.nbytes() for s in local.shards.values() if isinstance(s, ExpertShard))
        experts = local
    max_model_len = config.resolve_max_model_len(model_config.max_position_embeddings)
    attention = Attention(
        backend=select_attention_backend(config.attention_backend, device=device, dtype=parse_dtype(config.dtype)),
        num_heads=model_config.num_heads,
        head_dim=model_config.head_dim,
        window=model_config.sliding_window,
    )
    model = MixtralModel.load(
        config.model,
        model_config,
        experts=experts,
        attention=attention,
        dtype=config.dtype,
        device=device,
        progress=progress,
    )
    runner = ModelRunner(
        model, num_blocks=kv_blocks(config, model_config, max_model_len=max_model_len), block_size=config.block_size
    )
    tokenizer = Tokenizer.from_dir(config.model, tokenizer=config.tokenizer)
    core = EngineCore(
        runner,
        tokenizer,
        config.engine_config(),
        max_model_len=max_model_len,
        vocab_size=model_config.vocab_size,
        eos_token_id=model_config.eos_token_id,
        sliding_window=model_config.sliding_window,
        grammar=LLGuidanceGrammars(tokenizer, model_config.vocab_size),
    )
    return Frontend(
        config=config,
        model_config=model_config,
        tokenizer=tokenizer,
        model=model,
        runner=runner,
        core=core,
        device=device,
        local_expert_bytes=local_bytes,
    )
