"""Write small random-weight Mixtral checkpoints in the exact Hugging Face (or original Mistral) layout.

Used by ``mixserve tiny-model DIR``, the built-in default model of ``mixserve serve`` and the benchmarks, so every
part of the system runs end to end on a CPU with nothing downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.checkpoint.load import expected_shapes
from cluster.checkpoint.names import hf_to_mistral_name, unpermute_rotary
from cluster.config.model import ModelConfig
from cluster.text.tokenizer import default_model_file


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a random checkpoint. The default runs comfortably on 2 CPU cores."""

    layers: int = 2
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    experts: int = 8
    top_k: int = 2
    vocab: int = 32000
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False

    def config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim or self.hidden // self.heads,
            num_experts=self.experts,
            top_k=self.top_k,
            rms_norm_eps=1e-5,
            rope_theta=self.rope_theta,
            sliding_window=self.sliding_window,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )


BENCH_SPEC = TinyModelSpec(layers=4, hidden=512, intermediate=1792, heads=8, kv_heads=4, experts=8, top_k=2)
# One layer of Mixtral-8x7B (its expert, attention and router shapes) under a 2048-token vocabulary: a decoded token
# reads its bytes as Mixtral's 32 layers do, 87% experts (two 3 x 14336 x 4096), 10% attention, 2% lm_head
# (Mixtral-8x7B: 88.4 / 10.5 / 1.0). BENCH_SPEC's 32000-row lm_head is instead 40% of what a token reads there.
MIXTRAL_LAYER_SPEC = TinyModelSpec(
    layers=1, hidden=4096, intermediate=14336, heads=32, kv_heads=8, experts=8, top_k=2, vocab=2048
)


def random_weights(config: ModelConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors under Hugging Face names; linear weights N(0, 0.02), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=g)
    return out


def write_checkpoint(
    folder: str | Path,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    fmt: str = "hf",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write ``tensors`` (Hugging Face names) as a checkpoint folder with a tokenizer.model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt not in ("hf", "mistral"):
        raise ValueError(f"format must be 'hf' or 'mistral', got {fmt!r}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    shutil.copyfile(tokenizer or default_model_file(), folder / "tokenizer.model")
    if fmt == "mistral":
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name.endswith("self_attn.q_proj.weight"):
                t = unpermute_rotary(t, config.num_heads).contiguous()
            elif name.endswith("self_attn.k_proj.weight"):
                t = unpermute_rotary(t, config.num_kv_heads).contiguous()
            out[hf_to_mistral_name(name)] = t
        (folder / "params.json").write_text(json.dumps(config.to_mistral_params(), indent=2))
        names = sorted(out)
        if shards == 1:
            save_file(out, str(folder / "consolidated.safetensors"))
        else:
            for i in range(shards):
                part = {n: out[n] for n in names[i::shards]}
                save_file(part, str(folder / f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"))
        return folder
    cfg = config.to_hf_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tiny_model(
    folder: str | Path,
    spec: TinyModelSpec = TinyModelSpec(),
    *,
    seed: int = 0,
    shards: int = 1,
    fmt: str = "hf",
    dtype: torch.dtype = torch.float32,
) -> Path:
    config = spec.config()
    return write_checkpoint(folder, config, random_weights(config, seed=seed), shards=shards, fmt=fmt, dtype=dtype)


def default_model_dir() -> Path:
    """The built-in default model, made once into a cache folder (``$MIXSERVE_CACHE`` or ~/.cache/mixserve)."""
    root = Path(os.environ.get("MIXSERVE_CACHE", Path.home() / ".cache" / "mixserve"))
    folder = root / "tiny-default-v1"
    if not (folder / "config.json").is_file():
        # Several processes may race here (ingress and frontend replicas): write aside, then rename atomically.
        tmp = root / f".tiny-default-v1.tmp-{os.getpid()}-{id(folder)}"
        write_tiny_model(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won; its copy is identical (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
