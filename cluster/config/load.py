"""Where the model comes from and how it is loaded: the checkpoint folder (or a cached Hugging Face id), dtype,
tokenizer, frontend device, attention backend and quantize-on-load. The first part of
:class:`~cluster.config.cluster.ClusterConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cluster.config.quantization import OnLoad

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackend = Literal["auto", "sdpa", "eager", "flash_attention_2"]


class LoadConfig(BaseModel):
    """The checkpoint and how to load it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None,
        description="checkpoint folder (config.json or params.json, safetensors, tokenizer), or a Hugging Face model "
        "id already in the local Hugging Face cache; None: the built-in tiny model",
    )
    dtype: Dtype = Field("auto", description="weights and activations; auto: the checkpoint's own (see resolve_dtype)")
    download: bool = Field(False, description="let a Hugging Face model id be downloaded when it is not cached")
    tokenizer: str | None = Field(None, description="tokenizer file or folder; None: the checkpoint's own")
    device: str | None = Field(None, description="frontend device; None: cuda when available, else cpu")
    attention_backend: AttentionBackend = Field("auto", description="auto: flash-attention-2 when usable, else sdpa")
    quantization: OnLoad | None = Field(
        None,
        description="quantize a dense checkpoint's experts while loading (weight-only, scales from the weights): "
        "int8 per channel, int4 groups of 128, fp8 e4m3 per channel; None: as stored (a quantized checkpoint loads "
        "quantized by itself)",
    )
    quantize_attention: bool = Field(
        False,
        description="with quantization: quantize attention's q, k, v and o projections too, on the frontend (then "
        "every linear but the router gates and lm_head is quantized, as vLLM's --quantization does); a quantized "
        "checkpoint's attention is served as stored either way",
    )

    @field_validator("quantize_attention")
    @classmethod
    def _attention_needs_a_kind(cls, v: bool, info: ValidationInfo) -> bool:
        if v and "quantization" in info.data and info.data["quantization"] is None:  # (not when it failed itself)
            raise ValueError("needs quantization (int8, int4 or fp8): the kind to quantize attention to")
        return v
