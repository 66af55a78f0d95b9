"""Quantized Mixtral checkpoints written the way their own tools write them, and the dense reference each is
compared with. Independent of mixserve's readers: compressed-tensors writes its formats itself (its compressors and
its ``QuantizationConfig``); GPTQ, AWQ and AutoFP8 are packed here following AutoGPTQ's ``QuantLinear.pack``,
AutoAWQ's ``WQLinear_GEMM.from_linear`` and AutoFP8's per-tensor scheme, loop by loop as those write them.

Each writer takes a folder that ``tests.helpers.hf_mixtral`` filled (config.json, model.safetensors, tokenizer),
replaces its weights with the quantized ones, adds ``quantization_config``, and returns the exact float32
dequantized state dict (Hugging Face names), from which :func:`dense_reference` builds a transformers model.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

QUANTIZED = re.compile(r"self_attn\.[qkvo]_proj\.weight$|experts\.\d+\.w[123]\.weight$")  # what every writer quantizes
GATE_AND_HEAD = ["lm_head", "re:.*block_sparse_moe\\.gate$"]


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> None:
    (folder / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# ------------------------------------------------------------------------------------------ compressed-tensors
CT_SCHEMES = {
    # name -> (format, weights args, input activation args)
    "w4a16": ("pack-quantized", dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32), None),
    "w4a16-asym": (
        "pack-quantized",
        dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
        None,
    ),
    "w8a16": ("pack-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel"), None),
    "w8a8-naive": (
        "naive-quantized",
        dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
        dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
    ),
    "fp8": (
        "float-quantized",
        dict(num_bits=8, type="float", symmetric=True, strategy="tensor"),
        dict(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False),
    ),
    "fp8-dynamic": (
        "float-quantized",
        dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
        dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True),
    ),
}


def write_compressed(folder: Path, scheme_name: str, *, ignore: list[str] | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors: its compressor for ``format`` on every linear but the router gates and lm_head (or
    ``ignore``), scales from its own ``calculate_qparams`` (rounded to bfloat16 numbers, held in float32). Returns
    compressed-tensors' own decompression."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    fmt, wargs, aargs = CT_SCHEMES[scheme_name]
    args = QuantizationArgs(**wargs)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=args, input_activations=None if aargs is None else QuantizationArgs(**aargs)
    )
    ignore = GATE_AND_HEAD if ignore is None else ignore
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    dense = load_file(folder / "model.safetensors")
    out, reference = {}, {}
    for name, w in dense.items():
        module = name.removesuffix(".weight")
        if not QUANTIZED.search(name) or any(
            re.match(i[3:], module) if i.startswith("re:") else i == module for i in ignore
        ):
            out[name] = reference[name] = w
            continue
        scale, zero = calculate_qparams(*_ranges(w, args.strategy, args.group_size), args)
        # bfloat16 numbers (a bfloat16 model's scales) stored in float32, so transformers' dequantization is exact
        state = {"weight": w, "weight_scale": scale.bfloat16().float(), "weight_zero_point": zero}
        if aargs is not None and not aargs.get("dynamic"):
            state["input_scale"] = torch.tensor([0.05])
        packed = compressor.compress(state, scheme)
        out.update({f"{module}.{k}": v for k, v in packed.items()})
        reference[name] = compressor.decompress(packed, scheme)["weight"].float()
    qconfig = config.model_dump(exclude={"quant_method"})
    qconfig.update(quant_method="compressed-tensors", quantization_status="compressed")
    _rewrite(folder, out, qconfig)
    return reference


def _ranges(w: torch.Tensor, strategy: str, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if strategy == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    assert group is not None
    g = w.reshape(w.shape[0], -1, group)
    return g.amin(-1), g.amax(-1)


# ------------------------------------------------------------------------------------------ AutoFP8
def write_autofp8(folder: Path, *, activation_scheme: str = "static") -> dict[str, torch.Tensor]:
    """AutoFP8's checkpoint: e4m3 weights with one 0-d ``weight_scale`` per linear (max |w| / 448), a 0-d
    ``input_scale`` when static, every linear but lm_head and the router gates (``ignored_layers``)."""
    dense = load_file(folder / "model.safetensors")
    out, reference, ignored = {}, {}, ["lm_head"]
    for name, w in dense.items():
        if name.endswith("block_sparse_moe.gate.weight"):
            ignored.append(name.removesuffix(".weight"))
        if not QUANTIZED.search(name):
            out[name] = reference[name] = w
            continue
        module = name.removesuffix(".weight")
        scale = w.abs().max().float() / 448.0
        q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name], out[f"{module}.weight_scale"] = q, scale.reshape(())
        if activation_scheme == "static":
            out[f"{module}.input_scale"] = torch.tensor(0.05)
        reference[name] = q.float() * scale
    _rewrite(folder, out, {"quant_method": "fp8", "activation_scheme": activation_scheme, "ignored_layers": ignored})
    return reference


# ------------------------------------------------------------------------------------------ GPTQ / AWQ
def _minmax_int(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool):
    """Per-group min-max quantization of w [N, K] as GPTQ's quantizer does: scales and zeros [groups, N], the
    integers [N, K]."""
    maxq = 2**bits - 1
    scales, zeros = torch.empty(groups, w.shape[0]), torch.empty(groups, w.shape[0])
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.amin(1).clamp_max(0), cols.amax(1).clamp_min(0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        s = ((hi - lo) / maxq).clamp_min(1e-8).half().float()  # stored as float16
        scales[g] = s
        zeros[g] = torch.full_like(s, (maxq + 1) / 2) if sym else torch.round(-lo / s)
    q = torch.round(w / scales[g_idx].t() + zeros[g_idx].t()).clamp(0, maxq).to(torch.int64)
    return scales, zeros.to(torch.int64), q


def write_gptq(folder: Path, *, bits: int = 4, group: int = 32, desc_act: bool = False, sym: bool = True, seed=0):
    """AutoGPTQ's layout (``checkpoint_format: gptq``: zeros stored minus one). With ``desc_act`` the groups follow
    a random order of the input features (the same for w1 and w3 of an expert, which share their input)."""
    gen = torch.Generator().manual_seed(seed)
    dense = load_file(folder / "model.safetensors")
    out, reference, orders = {}, {}, {}
    for name, w in dense.items():
        if not QUANTIZED.search(name):
            out[name] = reference[name] = w
            continue
        n, k = w.shape
        g_idx = torch.arange(k) // group
        if desc_act:
            shared = re.sub(r"w3\.weight$", "w1.weight", name)
            order = orders.setdefault((shared, k), torch.randperm(k, generator=gen))
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[order] = torch.arange(k) // group
        scales, zeros, q = _minmax_int(w.float(), g_idx, k // group, bits, sym)
        module = name.removesuffix(".weight")
        out[f"{module}.qweight"] = _pack_rows(q.t().numpy().astype(np.uint32), bits)  # along K: [K b / 32, N]
        out[f"{module}.qzeros"] = _pack_cols((zeros - 1).numpy().astype(np.uint32) & (2**bits - 1), bits)
        out[f"{module}.scales"] = scales.half()
        out[f"{module}.g_idx"] = g_idx.to(torch.int32)
        reference[name] = (q - zeros[g_idx].t()).float() * scales[g_idx].t()
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym}
    _rewrite(folder, out, {**qc, "checkpoint_format": "gptq", "damp_percent": 0.1, "true_sequential": True})
    return reference


def _pack_rows(intweight: np.ndarray, bits: int) -> torch.Tensor:
    """AutoGPTQ's loop: qweight[row] |= intweight[j] << (bits * (j - i)), 32 / bits rows of [K, N] per word row."""
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << (bits * j)
    return torch.from_numpy(qweight.view(np.int32).copy())


def _pack_cols(zeros: np.ndarray, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """qzeros[:, col] |= zeros[:, col * per + order[i]] << (bits * i) (AutoGPTQ: order 0..per-1; AutoAWQ: its own)."""
    per = 32 // bits
    order = order or list(range(per))
    packed = np.zeros((zeros.shape[0], zeros.shape[1] // per), dtype=np.uint32)
    for col in range(packed.shape[1]):
        for i in range(per):
            packed[:, col] |= zeros[:, col * per + order[i]] << (bits * i)
    return torch.from_numpy(packed.view(np.int32).copy())


def write_awq(folder: Path, *, group: int = 32) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: qweight [K, N / 8] and qzeros [K / G, N / 8] packed along N in the order
    0 2 4 6 1 3 5 7, scales [K / G, N] float16; the router gates stay dense (``modules_to_not_convert``)."""
    awq_order = [0, 2, 4, 6, 1, 3, 5, 7]
    dense = load_file(folder / "model.safetensors")
    out, reference = {}, {}
    for name, w in dense.items():
        if not QUANTIZED.search(name):
            out[name] = reference[name] = w
            continue
        n, k = w.shape
        g_idx = torch.arange(k) // group
        scales, zeros, q = _minmax_int(w.float(), g_idx, k // group, 4, sym=False)
        module = name.removesuffix(".weight")
        out[f"{module}.qweight"] = _pack_cols(q.t().numpy().astype(np.uint32), 4, awq_order)
        out[f"{module}.qzeros"] = _pack_cols(zeros.numpy().astype(np.uint32), 4, awq_order)
        out[f"{module}.scales"] = scales.half()
        reference[name] = (q - zeros[g_idx].t()).float() * scales[g_idx].t()
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    _rewrite(folder, out, {**qc, "modules_to_not_convert": ["gate"]})
    return reference


# ------------------------------------------------------------------------------------------ references
def dense_reference(folder: Path, reference: dict[str, torch.Tensor], out: Path):
    """A transformers MixtralForCausalLM (float32) of the dequantized weights: the checkpoint's config without its
    quantization_config (if any), saved to ``out`` and loaded back."""
    from transformers import MixtralForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    save_file({k: v.float().contiguous() for k, v in reference.items()}, out / "model.safetensors")
    shutil.copyfile(folder / "tokenizer.model", out / "tokenizer.model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def transformers_dequantized(folder: Path):
    """transformers' own loading of a compressed-tensors checkpoint, dequantized, in float32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
        ).eval()
