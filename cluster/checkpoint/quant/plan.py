"""Strict coverage for a quantized checkpoint: each tensor of the model (``expected_shapes``) is one module, stored
dense (``weight``) or as its scheme's parts (``weight_packed``, ``qweight`` ...); every part must be stored, and
every stored tensor must be a part of one module or be skipped on purpose (AutoFP8's KV-cache scales: the cache
stays in the serving dtype). Errors name the file and the tensor, and say which way the config and the files
disagree.

Example: a compressed-tensors w4a16 checkpoint stores ``model.layers.0.block_sparse_moe.experts.0.w1`` as
``.weight_packed``, ``.weight_scale`` and ``.weight_shape``; a ``.weight`` there instead is an error saying the
config quantizes that module but the file stores it dense.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cluster.checkpoint.files import CheckpointFiles
from cluster.checkpoint.quant.formats import parts_of
from cluster.checkpoint.quant.parts import Part, dense_part
from cluster.checkpoint.roles import is_linear
from cluster.config.model import ModelConfig
from cluster.config.quantization import QuantizationConfig, WeightScheme
from cluster.errors import CheckpointError

log = logging.getLogger("mixserve")

# AutoFP8 / vLLM fp8 KV-cache scales: read by nothing here, the KV cache stays in the serving dtype
_KV_SCALES = re.compile(r"^model\.layers\.\d+\.self_attn\.((k|v|kv)_scale|[kv]_proj\.output_scale)$")


@dataclass(frozen=True)
class ModuleParts:
    """One tensor of the model as stored: its scheme (None: dense), each part's stored name and file, and specs."""

    name: str  # Hugging Face weight name, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]
    scheme: WeightScheme | None
    stored: dict[str, tuple[str, Path]]  # part suffix -> (stored name, file)
    specs: dict[str, Part]


def quantized_plan(
    files: CheckpointFiles, config: ModelConfig, shapes: dict[str, tuple[int, ...]]
) -> dict[str, ModuleParts]:
    """Hugging Face weight name -> :class:`ModuleParts`, for every tensor of the model (strict, see the module)."""
    q = config.quantization
    assert q is not None
    if files.layout != "hf":
        raise CheckpointError(f"{files.folder}: a quantization_config needs the Hugging Face layout (config.json)")
    stored = files.tensor_files
    plan: dict[str, ModuleParts] = {}
    claimed: set[str] = set()
    for hf, shape in shapes.items():
        module = hf.removesuffix(".weight")
        scheme = _scheme(q, module, stored) if is_linear(hf) else None
        specs = dense_part(shape) if scheme is None else parts_of(scheme, shape[0], shape[1], module=module)
        parts = {}
        for suffix, spec in specs.items():
            name = f"{module}.{suffix}"
            if name in stored:
                parts[suffix] = (name, stored[name])
                claimed.add(name)
            elif not spec.optional:
                missing = f"tensor {name!r} is missing from the checkpoint"
                raise CheckpointError(f"{files.folder}: {missing}{_why(q, scheme)}")
        plan[hf] = ModuleParts(hf, shape, scheme, parts, specs)
    _check_leftovers(files, config, q, claimed)
    return plan


def _scheme(q: QuantizationConfig, module: str, stored: dict[str, Path]) -> WeightScheme | None:
    if q.by_files and f"{module}.qweight" not in stored:
        return None
    return q.scheme_for(module)


def _why(q: QuantizationConfig, scheme: WeightScheme | None) -> str:
    if scheme is None:
        return f" (quantization_config ({q.method}) leaves this module dense)"
    return f" (quantization_config ({q.method}) stores this module {scheme.format} {scheme.kind})"


def _check_leftovers(files: CheckpointFiles, config: ModelConfig, q: QuantizationConfig, claimed: set[str]) -> None:
    skipped = []
    for name, path in files.tensor_files.items():
        if name in claimed or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if q.method == "fp8" and _KV_SCALES.match(name):
            skipped.append(name)
            continue
        module, _, suffix = name.rpartition(".")
        hint = ""
        if f"{module}.weight" in files.tensor_files or any(n.startswith(module + ".") for n in claimed):
            hint = f"; quantization_config ({q.method}) says module {module!r} is stored otherwise"
        raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of this quantized Mixtral{hint})")
    if skipped:
        note = "%s: %d fp8 KV-cache scales skipped (the KV cache stays in the serving dtype)"
        log.info(note, files.folder, len(skipped))
