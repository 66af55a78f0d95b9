"""The one place that assembles a frontend: config -> tokenizer, model, expert client, runner, engine.

:class:`ClusterConfig` is the single typed configuration (engine limits, dtype, transport, resources); the offline
``LLM``, the Serve frontend deployment, the CLI flags (``cluster.options``) and the benchmarks all start from it.
:func:`build_frontend` builds what a frontend process holds, with the experts either loaded in-process (W = 0,
the reference path) or reached through an expert client over Ray (``cluster.cluster`` builds that client).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
import torch
from pydantic import Field, StrictInt, ValidationError, ValidationInfo, field_validator

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

log = logging.getLogger("mixserve")

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Transport = Literal["object_ref", "channel", "gloo", "nccl"]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
AttentionBackend = Literal["auto", "sdpa", "eager", "flash_attention_2"]


class ClusterConfig(EngineConfig):
    """Everything needed to build a serving frontend and its expert workers (plus the engine limits)."""

    model: str = Field(
        description="checkpoint folder (config.json or params.json, safetensors, tokenizer), or a Hugging Face model "
        "id already in the local Hugging Face cache"
    )
    dtype: Dtype = Field("auto", description="weights and activations; auto: the checkpoint's own (see resolve_dtype)")
    download: bool = Field(False, description="let a Hugging Face model id be downloaded when it is not cached")
    expert_workers: StrictInt = Field(0, ge=0, description="expert-worker actors; 0 runs every expert in the frontend")
    transport: Transport = Field(
        "object_ref",
        description="how tokens travel to the workers (channel: Ray Compiled Graph channels; gloo/nccl: RDT)",
    )
    expert_replicas: StrictInt = Field(
        1,
        ge=1,
        description="copies of every expert, each on a different worker (and node when possible): with 2, a dead "
        "worker fails no request. Costs R times the expert memory; needs transport object_ref",
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

    @field_validator("expert_replicas")
    @classmethod
    def _replicas(cls, v: int, info: ValidationInfo) -> int:
        """Checked against the fields declared before it (expert_workers, transport)."""
        workers, transport = info.data.get("expert_workers"), info.data.get("transport")
        if v > 1 and workers is not None and v > workers:
            raise ValueError(
                f"{v} copies of every expert need at least {v} expert_workers (got {workers}): the copies of an "
                "expert live on distinct workers"
            )
        if v > 1 and transport not in (None, "object_ref"):
            raise ValueError(
                f"copies of experts need transport object_ref (got {transport}): a compiled graph or an RDT group "
                "cannot leave out a dead worker within a step"
            )
        return v

    @classmethod
    def create(cls, **kwargs: Any) -> ClusterConfig:
        """Validated (a bad value is a :class:`SetupError` naming the field) and resolved: the model is a local
        folder (a Hugging Face id is looked up in the local cache) and ``dtype`` is concrete."""
        try:
            config = cls(**kwargs)
        except ValidationError as e:
            raise SetupError(describe(e, f"invalid {cls.__name__}")) from None
        return config.resolved()

    def resolved(self) -> ClusterConfig:
        """This config with the model as a local folder and a concrete dtype (idempotent)."""
        folder = model_folder(self.model, download=self.download)
        dtype = resolve_dtype(self.dtype, folder, self.device or default_device())
        if (folder, dtype) == (self.model, self.dtype):
            return self
        return self.model_copy(update={"model": folder, "dtype": dtype})

    def placement(self, config: ModelConfig) -> ExpertPlacement:
        if self.expert_placement is None:
            return ExpertPlacement.contiguous(
                num_layers=config.num_layers,
                num_experts=config.num_experts,
                num_workers=self.expert_workers,
                replicas=self.expert_replicas,
            )
        return ExpertPlacement.from_map(
            self.expert_placement,
            num_layers=config.num_layers,
            num_experts=config.num_experts,
            num_workers=self.expert_workers,
            replicas=self.expert_replicas,
        )


def describe(e: ValidationError, what: str) -> str:
    """One line naming every bad field: ``what: field: problem; field: problem``."""
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in e.errors())
    return f"{what}: {problems}"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_folder(model: str, *, download: bool = False) -> str:
    """A checkpoint folder as given, or the local snapshot of a Hugging Face model id ("org/name"). Nothing is
    downloaded unless ``download``."""
    if Path(model).is_dir():
        return model
    if model.count("/") != 1 or Path(model).exists():
        raise SetupError(f"model {model!r} is not a checkpoint folder")
    try:
        return huggingface_hub.snapshot_download(model, local_files_only=not download)
    except Exception as e:  # the hub client raises several types for "not cached" / "not found"
        hint = "" if download else " (mixserve downloads nothing unless asked: pass download=True / --download)"
        raise SetupError(f"model {model!r} is not a folder and not in the Hugging Face cache{hint}: {e}") from None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 runs faster than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, folder: str, device: str) -> str:
    """``auto``: the checkpoint's ``torch_dtype`` (``dtype`` in newer configs; bfloat16 for the original Mistral
    layout), except on a CPU: float16 runs as float32 there, and bfloat16 too when the CPU has no bf16 units."""
    if dtype != "auto":
        return dtype
    path = Path(folder) / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    want = str(saved.get("torch_dtype") or saved.get("dtype") or ("float32" if path.is_file() else "bfloat16"))
    want = want.removeprefix("torch.")
    if want not in ("float32", "bfloat16", "float16"):
        want = "float32"
    if torch.device(device).type == "cpu" and (want == "float16" or (want == "bfloat16" and not cpu_has_fast_bf16())):
        log.info("dtype auto: the checkpoint is %s; running float32 on this CPU (no fast %s matmuls)", want, want)
        return "float32"
    return want


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
            "threads": torch.get_num_threads(),
            "failovers": self.experts.failovers,
            "workers_down": sorted(self.experts.down),
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
    config = config.resolved()
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
