"""An expert worker's weights, expert by expert, in the form its kernels take: the checkpoint's own quantized
modules as stored, or a dense checkpoint quantized on load (``quantization``). Only one expert is ever held dense
(quantize-on-load), and only the experts asked for are read."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from cluster.checkpoint.load import iter_weights
from cluster.checkpoint.quant.quantize import quantize
from cluster.checkpoint.quant.weights import QuantWeight
from cluster.checkpoint.roles import EXPERT_RE, LoadRole
from cluster.config.model import ModelConfig
from cluster.config.quantization import OnLoad, check_on_load

ExpertWeights = tuple[torch.Tensor | QuantWeight, torch.Tensor | QuantWeight, torch.Tensor | QuantWeight]


def expert_weights(
    folder: str | Path,
    config: ModelConfig,
    experts: Iterable[tuple[int, int]],
    *,
    quantization: OnLoad | None = None,
    progress: bool = True,
    label: str = "experts",
) -> Iterator[tuple[tuple[int, int], ExpertWeights]]:
    """((layer, expert), (w1, w2, w3)) for each expert asked for, in the order the files hold them. A dense tensor
    stays dense (in the checkpoint's dtype) unless ``quantization`` asks for a kind; a quantized checkpoint takes
    no other kind than its own (:func:`~cluster.config.quantization.check_on_load`)."""
    check_on_load(config.quantization, quantization, folder=str(folder))
    pending: dict[tuple[int, int], dict[str, torch.Tensor | QuantWeight]] = {}
    role = LoadRole.expert_shard(experts)
    for hf, w in iter_weights(folder, config, role=role, progress=progress, label=label):
        m = EXPERT_RE.match(hf)
        assert m is not None, hf
        if quantization is not None and isinstance(w, torch.Tensor):
            w = quantize(w, quantization)
        key = (int(m.group(1)), int(m.group(2)))
        parts = pending.setdefault(key, {})
        parts[m.group(3)] = w
        if len(parts) == 3:
            del pending[key]
            yield key, (parts["w1"], parts["w2"], parts["w3"])
