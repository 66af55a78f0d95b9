"""Building a frontend: config -> tokenizer, non-expert model, KV cache, runner and engine (:func:`build_frontend`).

The experts are handed in as an :class:`~router.client.ExpertClient` (over Ray: built by
``cluster.runtime.transports`` for the workers of an expert pool), or ``None``: every expert is then loaded into
this process (W = 0, the reference path). The offline ``LLM``, the Serve frontend (both through
``cluster.runtime.runtime.FrontendRuntime``) and the benchmarks build their frontends here. No Ray is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.checkpoint.load import parse_dtype
from cluster.checkpoint.locate import default_device, resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.engine.core import EngineCore
from cluster.engine.grammar import LLGuidanceGrammars
from cluster.text.tokenizer import Tokenizer
from router.client import ExpertClient
from router.placement import ExpertPlacement
from router.transport import LocalTransport
from workers.attention import Attention, attention_compute_dtype, select_attention_backend
from workers.expert import ExpertShard
from workers.model import MixtralModel
from workers.runner import ModelRunner


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
            "model": self.config.load.model,
            "device": self.device,
            "attention_backend": self.model.attention.backend,
            "frontend_bytes": self.model.nbytes(),
            # each attention projection's form: its dtype when dense, "kind: kernel" when quantized
            "attention_weights": sorted({f for p in self.model.projections().values() for f in p.describe()}),
            "expert_bytes": self.local_expert_bytes,
            "kv_cache_bytes": self.runner.kv.nbytes(),
            "kv_blocks": self.runner.num_blocks,
            "kv_blocks_used": self.core.kv_blocks_used,
            "block_size": self.runner.block_size,
            "max_model_len": self.core.max_model_len,
            "engine": self.core.stats(),
            "threads": torch.get_num_threads(),
            "failovers": self.experts.failovers,
            "hedges": self.experts.hedges,  # of those: layers a worker answered late
            "workers_down": sorted(self.experts.down),
            "micro_batched_steps": self.model.micro_batched_steps,
        }

    def expert_load(self) -> list[list[int]]:
        return self.model.expert_load.snapshot()


def local_experts(config: ClusterConfig, model_config: ModelConfig, *, device: str, progress: bool) -> ExpertClient:
    """Every expert in this process, served as one local worker (W = 0). ``config`` must be resolved."""
    pairs = [(i, e) for i in range(model_config.num_layers) for e in range(model_config.num_experts)]
    load = config.load
    assert load.model is not None, "resolve the config first"
    shard = ExpertShard.load(
        load.model, model_config, pairs, dtype=load.dtype, device=device, progress=progress, label="experts",
        quantization=load.quantization,
    )  # fmt: skip
    placement = ExpertPlacement.contiguous(
        num_layers=model_config.num_layers, num_experts=model_config.num_experts, num_workers=1
    )
    return ExpertClient(placement, LocalTransport({0: shard}))


def kv_blocks(config: ClusterConfig, model_config: ModelConfig, *, max_model_len: int) -> int:
    """Blocks in the KV pool: ``num_kv_blocks``, else what ``kv_cache_memory_gb`` holds, else enough for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens (a sliding window bounds what one sequence holds)."""
    cache, engine = config.cache, config.engine
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    bs = engine.block_size
    if cache.kv_cache_memory_gb is not None:
        per_block = 2 * model_config.num_layers * bs * model_config.num_kv_heads * model_config.head_dim
        per_block *= torch.empty((), dtype=parse_dtype(config.load.dtype)).element_size()
        return max(1, int(cache.kv_cache_memory_gb * 2**30 // per_block))
    span = max_model_len
    if model_config.sliding_window is not None:
        span = min(span, model_config.sliding_window + engine.max_num_batched_tokens + bs)
    return engine.max_num_seqs * -(-span // bs)


def _model(
    config: ClusterConfig, model_config: ModelConfig, experts: ExpertClient, *, device: str, progress: bool
) -> MixtralModel:
    load = config.load
    assert load.model is not None, "resolve the config first"
    dtype = parse_dtype(load.dtype)
    attention = Attention(
        backend=select_attention_backend(load.attention_backend, device=device, dtype=dtype),
        num_heads=model_config.num_heads,
        head_dim=model_config.head_dim,
        window=model_config.sliding_window,
        compute_dtype=attention_compute_dtype(device=device, dtype=dtype),
    )
    return MixtralModel.load(
        load.model, model_config, experts=experts, attention=attention, dtype=load.dtype, device=device,
        progress=progress, quantize_attention=load.quantization if load.quantize_attention else None,
    )  # fmt: skip


def build_frontend(config: ClusterConfig, *, experts: ExpertClient | None = None, progress: bool = True) -> Frontend:
    """Tokenizer, non-expert weights, KV cache and engine; ``experts`` None loads every expert here (W = 0)."""
    config = resolve(config)
    load = config.load
    assert load.model is not None
    model_config = ModelConfig.from_dir(load.model)
    device = load.device or default_device()
    local_bytes = 0
    if experts is None:
        experts = local_experts(config, model_config, device=device, progress=progress)
        transport = experts.transport
        assert isinstance(transport, LocalTransport)
        local_bytes = sum(s.nbytes() for s in transport.shards.values() if isinstance(s, ExpertShard))
    max_model_len = config.engine.resolve_max_model_len(model_config.max_position_embeddings)
    model = _model(config, model_config, experts, device=device, progress=progress)
    blocks = kv_blocks(config, model_config, max_model_len=max_model_len)
    runner = ModelRunner(model, num_blocks=blocks, block_size=config.engine.block_size)
    tokenizer = Tokenizer.from_dir(load.model, tokenizer=load.tokenizer)
    core = EngineCore(
        runner,
        tokenizer,
        config.engine,
        max_model_len=max_model_len,
        vocab_size=model_config.vocab_size,
        eos_token_id=model_config.eos_token_id,
        sliding_window=model_config.sliding_window,
        grammar=LLGuidanceGrammars(tokenizer, model_config.vocab_size),
        num_labels=model_config.num_labels,
        pad_token_id=model_config.pad_token_id,
    )
    experts.connect()
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
