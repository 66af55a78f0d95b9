"""The frontend's model: embeddings, attention, norms, gates and lm_head, with the experts taken from outside.

:class:`ModelRunner` runs one forward step over a batch of sequence chunks (decode tokens and prefill chunks mixed).
Per layer it routes once, builds one message per worker that has rows, hands them to its
:class:`~router.transport.ExpertClient` and combines the partial outputs. It never holds an expert weight.

Shapes: T tokens in the step, D hidden, H/Hkv heads, Dh head dim, V vocabulary, R rows whose logits are wanted.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.checkpoint import LoadRole, load_tensors, parse_dtype
from cluster.config import ModelConfig
from cluster.engine import EngineConfig, EngineCore, RequestOutput
from cluster.placement import ExpertPlacement
from cluster.sampling import SamplingParams
from router import dispatch
from router.gate import ExpertLoad, route
from router.transport import ExpertClient
from workers.kv_cache import KVCache, SeqChunk, StepPlan, plan_step
from workers.layers import Rope, apply_rope, attend_group, rms_norm, select_attention_backend

# Decode batches whose sequences x cached positions reach this attend on their cache slots in place (one small
# attention call per sequence) instead of gathering every slot into a padded batch (a copy of the whole context
# per layer). Measured on the bench model: at batch 32 and ~260 cached positions the gather+cat was ~30% of a step.
DECODE_VIEW_THRESHOLD = 2048


class ModelRunner:
    """Forward passes of the non-expert part of the model over a slot-based KV cache."""

    def __init__(
        self,
        *,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        experts: ExpertClient,
        placement: ExpertPlacement,
        num_slots: int,
        max_model_len: int,
        attention_backend: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.experts = experts
        self.placement = placement
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.backend = select_attention_backend(attention_backend, device=self.device, dtype=self.dtype)
        w = {k: v.to(self.device) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.final_norm = w["model.norm.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                {
                    "ln1": w[p + "input_layernorm.weight"],
                    "ln2": w[p + "post_attention_layernorm.weight"],
                    # q, k and v in one [q_size + 2 * kv_size, D] matrix: one matmul per layer instead of three
                    "qkv": torch.cat(
                        (
                            w[p + "self_attn.q_proj.weight"],
                            w[p + "self_attn.k_proj.weight"],
                            w[p + "self_attn.v_proj.weight"],
                        )
                    ),
                    "o": w[p + "self_attn.o_proj.weight"],
                    "gate": w[p + "block_sparse_moe.gate.weight"],
                }
            )
        self.worker_of_expert = [placement.worker_tensor(i).to(self.device) for i in range(config.num_layers)]
        self.rope = Rope(config.head_dim, config.rope_theta, self.device)
        self.scale = config.head_dim**-0.5
        self.window = config.sliding_window
        capacity = min(max_model_len, self.window) if self.window else max_model_len
        self.kv = KVCache(
            num_layers=config.num_layers,
            num_slots=num_slots,
            capacity=capacity,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.load = ExpertLoad(config.num_layers, config.num_experts)

    @classmethod
    def load_weights(
        cls, folder: str | Path, config: ModelConfig, *, dtype: str | torch.dtype, progress: bool = True
    ) -> dict[str, torch.Tensor]:
        """The frontend's tensors only: never an expert weight."""
        return load_tensors(
            folder, config, role=LoadRole.frontend(), dtype=parse_dtype(dtype), progress=progress, label="frontend"
        )

    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm] + [t for layer in self.layers for t in layer.values()]
        if not self.config.tie_word_embeddings:
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        chunks: list[SeqChunk],
        logit_rows: torch.Tensor,
        *,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One step. token_ids [T] (chunks laid end to end) -> float32 logits [R, V] for ``logit_rows`` [R].

        Writes this step's keys and values into the chunks' slots.
        """
        cfg = self.config
        plan: StepPlan = plan_step(
            chunks,
            capacity=self.kv.capacity,
            window=self.window,
            device=self.device,
            need_key_order=self.backend == "flash_attention_2",
            view_threshold=DECODE_VIEW_THRESHOLD if self.backend == "sdpa" else None,
        )
        T = token_ids.shape[0]
        h = F.embedding(token_ids.to(self.device), self.embed)  # [T, D]
        cos, sin = self.rope.cos_sin(plan.positions, self.dtype)
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw["ln1"], cfg.rms_norm_eps)
            q, k, v = F.linear(x, lw["qkv"]).split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
            q = apply_rope(q.reshape(T, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(k.reshape(T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            attn = torch.empty(T, cfg.num_heads, cfg.head_dim, dtype=self.dtype, device=self.device)
            for g in plan.groups:
                out = attend_group(
                    g,
                    q,
                    k,
                    v,
                    self.kv.k[i],
                    self.kv.v[i],
                    backend=self.backend,
                    scale=self.scale,
                    window=self.window,
                )
                attn[g.rows.reshape(-1)] = out.reshape(-1, cfg.num_heads, cfg.head_dim)
            self.kv.write(i, plan, k, v)
            for row, slot, n in plan.views:  # large decode batches: attend on the slot's cache in place
                out = F.scaled_dot_product_attention(
                    q[row].view(1, cfg.num_heads, 1, cfg.head_dim),
                    self.kv.k[i][slot, :n].transpose(0, 1).unsqueeze(0),
                    self.kv.v[i][slot, :n].transpose(0, 1).unsqueeze(0),
                    scale=self.scale,
                    enable_gqa=cfg.num_kv_heads != cfg.num_heads,
                )
                attn[row] = out.view(cfg.num_heads, cfg.head_dim)
            h = h + F.linear(attn.view(T, cfg.q_size), lw["o"])

            x = rms_norm(h, lw["ln2"], cfg.rms_norm_eps)
            routing = route(x, lw["gate"], cfg.top_k)
            self.load.add(i, routing.ids)
            messages = dispatch.plan(routing, self.worker_of_expert[i])
            partials = self.experts.run_layer(i, x, messages)
            h = h + dispatch.combine(messages, partials, like=x)
            if on_layer is not None:
                on_layer(i)
        h = rms_norm(h[logit_rows.to(self.device)], self.final_norm, cfg.rms_norm_eps)
        return F.linear(h, self.lm_head).float()


# ---------------------------------------------------------------------- the frontend process
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Frontend:
    """What a frontend process holds: tokenizer, non-expert weights, KV cache and the engine.

    ``experts`` is how the layers reach their experts: None loads every expert in this process (W = 0, the
    reference path); otherwise an :class:`~router.transport.ExpertClient` over remote workers. Hosted as-is in
    the caller's process, in a Ray actor, or in a Ray Serve replica.
    """

    def __init__(
        self,
        *,
        model: str,
        dtype: str = "float32",
        engine: EngineConfig | None = None,
        placement: ExpertPlacement | None = None,
        experts: ExpertClient | None = None,
        attention_backend: str = "auto",
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        from cluster.tokenizer import Tokenizer
        from router.transport import LocalExperts
        from workers.expert import ExpertShard

        engine = engine or EngineConfig()
        self.model = str(model)
        self.device = device or default_device()
        self.config = ModelConfig.from_dir(model)
        self.tokenizer = Tokenizer.from_dir(model)
        if experts is None:  # W = 0: every expert in this process, served as one local "worker"
            shard = ExpertShard.load(
                model,
                self.config,
                [(i, e) for i in range(self.config.num_layers) for e in range(self.config.num_experts)],
                dtype=dtype,
                device=self.device,
                progress=progress,
                label="experts (in-process)",
            )
            placement, experts = None, LocalExperts({0: shard})
            self.local_expert_bytes = shard.nbytes()
        else:
            self.local_expert_bytes = 0
        if placement is None:
            placement = ExpertPlacement.contiguous(
                num_layers=self.config.num_layers, num_experts=self.config.num_experts, num_workers=1
            )
        self.placement = placement
        self.runner = ModelRunner(
            config=self.config,
            weights=ModelRunner.load_weights(model, self.config, dtype=dtype, progress=progress),
            experts=experts,
            placement=placement,
            num_slots=engine.max_num_seqs,
            max_model_len=engine.resolve_max_model_len(self.config.max_position_embeddings),
            attention_backend=attention_backend,
            device=self.device,
        )
        self.core = EngineCore(self.runner, self.tokenizer, engine)

    # -- offline (synchronous) use --------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        """Run the prompts through the continuous-batching core until all finish; outputs in prompt order.

        Every prompt is validated first (a bad one fails the call before anything runs); prompts are then fed
        to the engine as its queue has room, so any number of prompts can be given at once.
        """
        from cluster.errors import EngineOverloadedError

        for p, sp in zip(prompts, params, strict=True):
            self.core.validate(p, sp)
        ids = [f"offline-{uuid.uuid4().hex}" for _ in prompts]
        pending = list(zip(ids, prompts, params, strict=True))
        pending.reverse()
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            while pending:
                rid, p, sp = pending[-1]
                try:
                    self.core.add_request(rid, p, sp)
                except EngineOverloadedError:
                    break
                pending.pop()
            for out in self.core.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in ids]

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.core.logits(token_ids)

    def info(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "attention_backend": self.runner.backend,
            "frontend_bytes": self.runner.nbytes(),
            "expert_bytes": self.local_expert_bytes,
            "kv_cache_bytes": self.runner.kv.nbytes(),
            "max_model_len": self.core.max_model_len,
        }

    def expert_load(self) -> list[list[int]]:
        return self.runner.load.snapshot()
