"""The Mixtral model as modules, with the experts handed in from outside.

    MixtralModel
      embed_tokens                      [V, D]
      layers[i]: DecoderLayer
        input_layernorm                 RMSNorm
        self_attn: SelfAttention        qkv_proj [(H + 2 Hkv) Dh, D], o_proj [D, H Dh] (Projections: dense or
                                        quantized), RoPE, Attention
        post_attention_layernorm        RMSNorm
        block_sparse_moe: MoEBlock      gate [E, D] (top-k in float32); experts = an ExpertClient, not weights
      norm                              RMSNorm
      lm_head                           [V, D] (the embedding when tied; none in a classifier)
      score                             [C, D] a classifier's head (MixtralForSequenceClassification)

:meth:`MixtralModel.load_weights` owns the mapping from checkpoint tensor names to these modules and is strict:
every non-expert tensor is used, every parameter is filled. The model never holds an expert weight.

Two micro-batches in flight: when the expert client asks for it (``ExpertClient.overlap_min_batch``) and a step has
at least that many tokens in two or more chunks, the step is cut at the chunk boundary nearest its middle into
halves A and B, each with its share of the step's layout (:func:`workers.kv_cache.split_plan`). Per layer, A's
attention and gate run and its experts are sent (``ExpertClient.submit``); while the workers run them the frontend
runs B's attention and gate and sends B; then A's reply is added and A goes on to the next layer while the workers
run B. Every token sees exactly the same operations as without the split (sequences never share a chunk, so no half
reads the other's keys), only in another order.

Every step records the experts each token was routed to, per layer ([T, L, K], written by each MoE block into its
column), which the runner keeps beside the KV cache (``workers.runner``).

Shapes: T tokens in the step, D hidden, H/Hkv heads, Dh head dim, E experts, L layers, K experts per token, V
vocabulary, C labels, R rows whose logits are wanted, P rows whose hidden states are wanted, k tokens in the first
micro-batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cluster.checkpoint.load import LoadRole, iter_weights, parse_dtype
from cluster.checkpoint.quant.quantize import quantize
from cluster.checkpoint.quant.weights import QuantWeight
from cluster.config.model import ModelConfig
from cluster.config.quantization import OnLoad
from cluster.engine.step import StepOutput
from cluster.errors import CheckpointError
from router.client import ExpertClient, Pending
from router.gate import ExpertLoad, route
from workers import dense
from workers.attention import Attention
from workers.kv_cache import KVCache, LayerKV, StepPlan, split_plan, split_point
from workers.layers import Rope, apply_rope, rms_norm
from workers.projection import Projection

_PROJECTION = re.compile(r"\.self_attn\.[qkvo]_proj\.weight$")


def _as_held(
    name: str, w: torch.Tensor | QuantWeight, dtype: torch.dtype, quantize_attention: OnLoad | None
) -> torch.Tensor | QuantWeight:
    """A stored non-expert weight in the form the model holds it: attention's projections quantized as stored (or
    to ``quantize_attention``), everything else dense in ``dtype``."""
    if _PROJECTION.search(name):
        if isinstance(w, torch.Tensor) and quantize_attention is not None:
            return quantize(w, quantize_attention)
        return w if not isinstance(w, torch.Tensor) else w.to(dtype).contiguous()
    return (w if isinstance(w, torch.Tensor) else w.dequantize()).to(dtype).contiguous()


def _param(*shape: int) -> nn.Parameter:
    """A placeholder until :meth:`MixtralModel.load_weights` assigns the checkpoint tensor (no memory)."""
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = _param(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """GQA self-attention: q, k and v in one matmul, RoPE on q and k, attention over the KV cache, o_proj."""

    def __init__(self, config: ModelConfig, attention: Attention) -> None:
        super().__init__()
        self.config = config
        self.qkv_proj = Projection.placeholder(config.q_size + 2 * config.kv_size, config.hidden_size)
        self.o_proj = Projection.placeholder(config.hidden_size, config.q_size)
        self.attention = attention

    def forward(
        self, x: torch.Tensor, plan: StepPlan, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV
    ) -> torch.Tensor:
        """x [T, D] -> [T, D]; writes this step's keys and values into ``kv``."""
        c = self.config
        T = x.shape[0]
        qk, v = self.qkv_proj(x).split((c.q_size + c.kv_size, c.kv_size), dim=-1)
        # q's and k's heads rotated together: one set of elementwise ops instead of two
        qk = apply_rope(qk.reshape(T, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)  # [T, H + Hkv, Dh]
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]  # [T, H, Dh], [T, Hkv, Dh]
        v = v.reshape(T, c.num_kv_heads, c.head_dim)
        out = self.attention(plan, q, k, v, kv)  # [T, H, Dh]
        return self.o_proj(out.reshape(T, c.q_size))


class MoEBlock(nn.Module):
    """Mixtral's sparse MoE: route each token to its top-k experts, which the expert client runs wherever they
    live, and sum their weighted outputs."""

    def __init__(self, config: ModelConfig, layer: int, experts: ExpertClient, load: ExpertLoad) -> None:
        super().__init__()
        self.gate = _param(config.num_experts, config.hidden_size)
        self.top_k = config.top_k
        self.layer = layer
        self.experts = experts
        self.load = load

    def submit(self, x: torch.Tensor, routed: torch.Tensor | None = None) -> Pending:
        """x [T, D] (normalised) -> the [T, D] output in flight; the chosen experts go to ``routed[:, layer]``
        (routed [T, L, K])."""
        routing = route(x, self.gate, self.top_k)  # ids, weights [T, K]
        self.load.add(self.layer, routing.ids)
        if routed is not None:
            routed[:, self.layer] = routing.ids
        return self.experts.submit(self.layer, x, routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] (normalised) -> [T, D]."""
        return self.submit(x).result()


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, attention: Attention, experts: ExpertClient, load: ExpertLoad
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MoEBlock(config, layer, experts, load)

    def start(
        self,
        h: torch.Tensor,
        plan: StepPlan,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV,
        routed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Pending]:
        """h [T, D] -> (h after attention [T, D], the MoE output [T, D] in flight); the layer's output is their sum.
        The experts chosen go to ``routed`` [T, L, K]."""
        h = h + self.self_attn(self.input_layernorm(h), plan, cos, sin, kv)
        return h, self.block_sparse_moe.submit(self.post_attention_layernorm(h), routed)

    def forward(
        self,
        h: torch.Tensor,
        plan: StepPlan,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV,
        routed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, moe = self.start(h, plan, cos, sin, kv, routed)
        return h + moe.result()


class MixtralModel(nn.Module):
    """Everything of Mixtral but the experts' weights. Build it, then :meth:`load_weights` (or use :meth:`load`)."""

    def __init__(self, config: ModelConfig, *, experts: ExpertClient, attention: Attention) -> None:
        super().__init__()
        self.config = config
        self.experts = experts
        self.attention = attention
        self.expert_load = ExpertLoad(config.num_layers, config.num_experts)
        self.embed_tokens = _param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, attention, experts, self.expert_load) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        untied = config.can_generate and not config.tie_word_embeddings
        self.lm_head = _param(config.vocab_size, config.hidden_size) if untied else None
        self.score = None if config.can_generate else _param(config.num_labels, config.hidden_size)
        self.rope = Rope(config.head_dim, config.rope_theta)
        self.micro_batched_steps = 0  # steps run as two micro-batches in flight

    @classmethod
    def load(
        cls,
        folder: str | Path,
        config: ModelConfig,
        *,
        experts: ExpertClient,
        attention: Attention,
        dtype: str | torch.dtype,
        device: torch.device | str = "cpu",
        progress: bool = True,
        quantize_attention: OnLoad | None = None,
    ) -> MixtralModel:
        """Read the non-expert tensors of the checkpoint (never an expert weight) into a new model on ``device``;
        ``quantize_attention``: the kind to quantize a dense checkpoint's attention projections to while loading (a
        quantized checkpoint is served as stored; see :meth:`load_weights`). Each tensor takes its held form as it is
        read, so no more than one stored copy exists beside the model's."""
        torch_dtype = parse_dtype(dtype)
        on_load = quantize_attention if config.quantization is None else None
        weights: dict[str, torch.Tensor | QuantWeight] = {}
        for name, w in iter_weights(folder, config, role=LoadRole.frontend(), progress=progress, label="frontend"):
            weights[name] = _as_held(name, w, torch_dtype, on_load)  # as each is read: one stored copy at a time
        model = cls(config, experts=experts, attention=attention)
        model.load_weights(weights, device=device, dtype=torch_dtype)
        return model

    def load_weights(
        self,
        weights: Mapping[str, torch.Tensor | QuantWeight],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        """Fill every parameter from Hugging Face tensor names (``cluster.checkpoint.load`` maps the original Mistral
        names to these). Every tensor given must be used and every parameter filled, with the right shape.

        Attention's projections are held as given, dense (in ``dtype``) or quantized (``workers.projection``; a
        quantized one runs through its kernel). Every other weight (embeddings, norms, router gates, lm_head) is
        dense: a quantized one is dequantized exactly, in float32, then cast to ``dtype``."""
        c = self.config
        names = {
            "model.embed_tokens.weight": "embed_tokens",
            "model.norm.weight": "norm.weight",
        }
        if self.lm_head is not None:
            names["lm_head.weight"] = "lm_head"
        if self.score is not None:
            names["score.weight"] = "score"
        projections: dict[str, tuple[str, ...]] = {}
        for i in range(c.num_layers):
            p, m = f"model.layers.{i}.", f"layers.{i}."
            names[p + "input_layernorm.weight"] = m + "input_layernorm.weight"
            names[p + "post_attention_layernorm.weight"] = m + "post_attention_layernorm.weight"
            names[p + "block_sparse_moe.gate.weight"] = m + "block_sparse_moe.gate"
            # q, k and v in one [q_size + 2 * kv_size, D] matrix where they allow: one matmul per layer, not three
            projections[m + "self_attn.qkv_proj"] = tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")
            projections[m + "self_attn.o_proj"] = (p + "self_attn.o_proj.weight",)
        used = set(names) | {n for parts in projections.values() for n in parts}
        unexpected = sorted(set(weights) - used)
        if unexpected:
            raise CheckpointError(f"tensor {unexpected[0]!r} is not a non-expert tensor of this model")
        missing = sorted(used - set(weights))
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint")
        held = {n: _as_held(n, w, dtype, None) for n, w in weights.items()}  # as load() made them: no copies
        for src, dst in names.items():
            t = held[src]
            assert isinstance(t, torch.Tensor)
            self._assign(dst, t, device)
        for dst, parts in projections.items():
            self._assign_projection(dst, Projection.build([held[n] for n in parts], device=device, dtype=dtype))
        self.rope = Rope(c.head_dim, c.rope_theta, device)

    def _assign(self, name: str, tensor: torch.Tensor, device: torch.device | str) -> None:
        owner, _, attr = name.rpartition(".")
        module = self.get_submodule(owner) if owner else self
        old = getattr(module, attr)
        if tuple(old.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor for {name} has shape {tuple(tensor.shape)}; expected {tuple(old.shape)}")
        setattr(module, attr, nn.Parameter(tensor.to(device), requires_grad=False))

    def _assign_projection(self, name: str, projection: Projection) -> None:
        owner, _, attr = name.rpartition(".")
        module = self.get_submodule(owner)
        old = getattr(module, attr)
        if old.shape != projection.shape:
            raise CheckpointError(f"weights for {name} have shape {projection.shape}; expected {old.shape}")
        setattr(module, attr, projection)

    def projections(self) -> dict[str, Projection]:
        """Every layer's attention projections by name (``layers.0.self_attn.qkv_proj`` ...)."""
        return {
            f"layers.{i}.self_attn.{n}": getattr(layer.self_attn, n)
            for i, layer in enumerate(self.layers)
            for n in ("qkv_proj", "o_proj")
        }

    def matrices(self) -> dict[str, torch.Tensor | Projection]:
        """Every matrix a decode step multiplies by, by name: the attention projections, the router gates, and
        lm_head (the embedding when tied; a classifier's score head). An untied embedding is only indexed."""
        out: dict[str, torch.Tensor | Projection] = dict(self.projections())
        tied = self.lm_head is None and self.score is None  # a classifier only indexes its embedding
        out |= {n: p for n, p in self.named_parameters() if p.dim() == 2 and (tied or n != "embed_tokens")}
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def nbytes(self) -> int:
        """Bytes of every weight held here: parameters, and the projections as stored (quantized ones with their
        scales)."""
        params = sum(p.numel() * p.element_size() for p in self.parameters())
        return params + sum(p.nbytes() for p in self.projections().values())

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        plan: StepPlan,
        kv: KVCache,
        logit_rows: torch.Tensor,
        hidden_rows: torch.Tensor | None = None,
    ) -> StepOutput:
        """token_ids [T] laid out by ``plan`` -> float32 logits [R, V] of ``logit_rows`` [R], final hidden states
        [P, D] (and a classifier's scores [P, C]) of ``hidden_rows`` [P], and the routed experts [T, L, K]."""
        c = self.config
        h = F.embedding(token_ids.to(self.device), self.embed_tokens)  # [T, D]
        routed = torch.empty(h.shape[0], c.num_layers, c.top_k, dtype=torch.int16, device=self.device)
        cos, sin = self.rope.cos_sin(plan.positions, self.dtype)
        k = split_point(plan, self.experts.overlap_min_batch)
        if k is None:
            for layer, layer_kv in zip(self.layers, kv.layers, strict=True):
                h = layer(h, plan, cos, sin, layer_kv, routed)
        else:
            self.micro_batched_steps += 1
            h = self._two_micro_batches(h, split_plan(plan, k), cos, sin, kv, k, routed)
        return StepOutput(logits=self._logits(h, logit_rows), routed=routed, **self._pooled(h, hidden_rows))

    def _logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """h [T, D] -> float32 next-token logits [R, V] of ``rows`` [R] (a classifier has none to give)."""
        if self.score is not None:
            if rows.numel():
                raise ValueError("this model is a classifier: it has no lm_head to compute next-token logits")
            return torch.empty(0, self.config.vocab_size)
        lm_head = self.embed_tokens if self.lm_head is None else self.lm_head
        return dense.linear(self.norm(h[rows.to(self.device)]), lm_head).float()

    def _pooled(self, h: torch.Tensor, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """h [T, D] -> ``hidden`` [P, D] after the final norm and, in a classifier, ``scores`` [P, C] of the score
        head (in the model's dtype, as transformers computes them), both float32; nothing without rows."""
        if rows is None or not rows.numel():
            return {}
        hidden = self.norm(h[rows.to(self.device)])  # [P, D]
        out = {"hidden": hidden.float()}
        if self.score is not None:
            out["scores"] = F.linear(hidden, self.score).float()  # [P, C]
        return out

    def _two_micro_batches(
        self,
        h: torch.Tensor,
        plans: tuple[StepPlan, StepPlan],
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVCache,
        k: int,
        routed: torch.Tensor,
    ) -> torch.Tensor:
        """h [T, D] as halves [:k] and [k:] ping-ponged through every layer (see the module docstring) -> [T, D];
        each half records its routing in its rows of ``routed`` [T, L, K]."""
        hs, cs, ss = [h[:k], h[k:]], [cos[:k], cos[k:]], [sin[:k], sin[k:]]
        rs = [routed[:k], routed[k:]]
        pending: list[Pending | None] = [None, None]
        try:
            for layer, layer_kv in zip(self.layers, kv.layers, strict=True):
                assert isinstance(layer, DecoderLayer)
                for i in (0, 1):
                    moe, pending[i] = pending[i], None
                    if moe is not None:  # half i's previous layer, run by the workers meanwhile
                        hs[i] = hs[i] + moe.result()
                    hs[i], pending[i] = layer.start(hs[i], plans[i], cs[i], ss[i], layer_kv, rs[i])
            for i in (0, 1):
                moe, pending[i] = pending[i], None
                assert moe is not None
                hs[i] = hs[i] + moe.result()
        finally:  # a failed step must not leave the other half's replies unread
            for moe in pending:
                if moe is not None:
                    moe.discard()
        return torch.cat(hs)
