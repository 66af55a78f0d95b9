"""A checkpoint's quantization, read from ``config.json``'s ``quantization_config`` (no torch), and the schemes of
quantize-on-load (``LoadConfig.quantization``).

Four ``quant_method`` values are understood, each becoming one frozen :class:`QuantizationConfig`:

- ``compressed-tensors`` (what llm-compressor writes): ``config_groups`` (targets -> weight scheme), ``ignore``,
  ``format`` (``pack-quantized`` int4/int8, ``naive-quantized`` int8, ``float-quantized`` FP8 e4m3; a group may
  name its own format); targets and ignore entries are module names, ``re:`` regexes (matched from the start of the
  name, as compressed-tensors does) or the class name ``Linear`` (every linear module of Mixtral).
- ``fp8`` (AutoFP8 / vLLM's own): e4m3 weights with a per-tensor ``weight_scale``; ``activation_scheme`` static
  (a stored ``input_scale``) or dynamic; ``ignored_layers``.
- ``gptq``: ``bits`` 4 or 8, ``group_size`` (-1: per channel), ``desc_act``, ``sym``, ``checkpoint_format``
  (``gptq``: zeros stored minus one, as AutoGPTQ writes them; ``gptq_v2``: as they are).
- ``awq``: AutoAWQ's GEMM packing, 4 bits, with zero points.

For GPTQ and AWQ which modules are quantized is read from the stored tensor names (``qweight`` or ``weight``), as
their loaders do; the others say it in the config. Anything else (KV-cache schemes, sparsity, transforms, block
FP8, 2/3-bit, output activations) is a :class:`ConfigError` naming the field.

Example::

    q = QuantizationConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                      "sym": True}, source="config.json")
    q.scheme_for("model.layers.0.block_sparse_moe.experts.3.w1").group_size  # 128
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from cluster.config.json_fields import FieldReader, require_object
from cluster.errors import ConfigError

OnLoad = Literal["int8", "int4", "fp8"]
StorageFormat = Literal["pack-quantized", "naive-quantized", "float-quantized", "fp8", "gptq", "awq", "on-load"]
_CT_FORMATS = ("pack-quantized", "naive-quantized", "float-quantized", "int-quantized")


@dataclass(frozen=True)
class ActivationScheme:
    """How the scheme quantizes a linear's input: FP8 or int8, per tensor (a stored static ``input_scale``) or per
    token (dynamic). Kernels that cannot do it run weight-only and log a note."""

    type: Literal["int", "float"]
    num_bits: int
    dynamic: bool
    strategy: Literal["tensor", "token"]


@dataclass(frozen=True)
class WeightScheme:
    """How one linear module's weight is stored. ``group_size`` None: one scale per output channel (``channel``)
    or per matrix (``tensor``). ``g_idx``: a stored group index per input feature (GPTQ, compressed-tensors
    ``actorder: group``). ``zero_offset``: what the stored zero points lack (1 for GPTQ's v1 format)."""

    format: StorageFormat
    num_bits: int
    type: Literal["int", "float"]
    symmetric: bool
    strategy: Literal["tensor", "channel", "group"]
    group_size: int | None = None
    g_idx: bool = False
    zero_offset: int = 0
    activations: ActivationScheme | None = None

    @property
    def kind(self) -> OnLoad:
        """int8, int4 or fp8: what a worker keeps in memory."""
        return "fp8" if self.type == "float" else "int4" if self.num_bits == 4 else "int8"


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's quantization: (targets, scheme) groups, first match wins, minus ``ignore``."""

    method: Literal["compressed-tensors", "fp8", "gptq", "awq"]
    source: str
    groups: tuple[tuple[tuple[str, ...], WeightScheme], ...]
    ignore: tuple[str, ...] = ()
    by_files: bool = False  # GPTQ / AWQ: a module is quantized when its ``qweight`` is stored

    def scheme_for(self, module: str) -> WeightScheme | None:
        """The scheme of a linear module (Hugging Face name without ``.weight``), None when it is stored dense."""
        if any(_matches(module, t) for t in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(module, t) for t in targets):
                return scheme
        return None

    @property
    def kinds(self) -> set[OnLoad]:
        return {scheme.kind for _, scheme in self.groups}

    @classmethod
    def from_dict(cls, d: Any, *, source: str) -> QuantizationConfig:
        require_object(d, source)
        method = d.get("quant_method")
        readers = {"compressed-tensors": _compressed_tensors, "fp8": _fp8, "gptq": _gptq, "awq": _awq}
        if method not in readers:
            raise ConfigError(
                f"{source}: quant_method {method!r} is not supported; mixserve loads {', '.join(sorted(readers))}"
            )
        return readers[method](d, source)


def on_load_scheme(kind: OnLoad) -> WeightScheme:
    """What ``quantization=kind`` makes of a dense checkpoint's experts (weight-only, scales from the weights):
    int8 one scale per output channel (symmetric), int4 groups of 128 input features with zero points (as
    torch's int4 kernels take them), fp8 e4m3 one scale per output channel."""
    if kind == "int8":
        return WeightScheme("on-load", 8, "int", True, "channel")
    if kind == "int4":
        return WeightScheme("on-load", 4, "int", False, "group", group_size=128)
    return WeightScheme("on-load", 8, "float", True, "channel")


def check_on_load(checkpoint: QuantizationConfig | None, requested: OnLoad | None, *, folder: str) -> None:
    """A quantized checkpoint takes no other ``quantization``: the experts' stored kind, or none at all."""
    if checkpoint is None or requested is None:
        return
    expert = checkpoint.scheme_for("model.layers.0.block_sparse_moe.experts.0.w1")
    kinds = {expert.kind} if expert is not None else checkpoint.kinds
    if kinds != {requested}:
        raise ConfigError(
            f"{folder}: quantization={requested!r} conflicts with the checkpoint's own {checkpoint.method} "
            f"quantization ({'/'.join(sorted(kinds))}); leave quantization unset to serve it as stored"
        )


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    if target == "Linear":
        return True  # every module asked about is a linear (embeddings and norms are never quantized)
    return target == module or module.endswith("." + target)  # a full name, or its last parts ("gate", "lm_head")


# ---------------------------------------------------------------------------------------------------- readers
def _compressed_tensors(d: dict[str, Any], source: str) -> QuantizationConfig:
    src = f"{source} (quantization_config)"
    for unsupported in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
        if d.get(unsupported):
            raise ConfigError(f"{src}: field {unsupported!r} is not supported (only weight quantization is)")
    status = d.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{src}: quantization_status {status!r} is not supported; only 'compressed' checkpoints")
    default_format = _ct_format(d.get("format"), f"{src}.format", default="naive-quantized")
    groups_raw = d.get("config_groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ConfigError(f"{src}: field 'config_groups' must be a non-empty object")
    groups = []
    for name, g in groups_raw.items():
        gsrc = f"{src}.config_groups.{name}"
        require_object(g, gsrc)
        targets = _strings(g.get("targets"), f"{gsrc}.targets")
        if g.get("output_activations"):
            raise ConfigError(f"{gsrc}: field 'output_activations' is not supported")
        fmt = _ct_format(g.get("format"), f"{gsrc}.format", default=default_format)
        scheme = _ct_weights(g.get("weights"), f"{gsrc}.weights", fmt, _ct_inputs(g.get("input_activations"), gsrc))
        groups.append((tuple(targets), scheme))
    return QuantizationConfig("compressed-tensors", source, tuple(groups), tuple(_strings(d.get("ignore", []), src)))


def _ct_format(value: Any, where: str, *, default: str) -> Any:
    if value is None:
        return default
    if value not in _CT_FORMATS:
        raise ConfigError(f"{where}: format {value!r} is not supported; use one of {', '.join(_CT_FORMATS)}")
    return "naive-quantized" if value == "int-quantized" else value


def _ct_weights(w: Any, where: str, fmt: Any, inputs: ActivationScheme | None) -> WeightScheme:
    if not isinstance(w, dict):
        raise ConfigError(f"{where}: must be an object (weight-only or weight-and-activation schemes)")
    r = FieldReader(w, where)
    kind, bits = w.get("type", "int"), r.int("num_bits", default=8)
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
    if (kind, bits) not in (("int", 4), ("int", 8), ("float", 8)):
        raise ConfigError(f"{where}: {kind} {bits}-bit weights are not supported (int4, int8 and fp8 are)")
    if strategy not in ("tensor", "channel", "group"):
        raise ConfigError(f"{where}: strategy {strategy!r} is not supported (tensor, channel and group are)")
    if w.get("dynamic"):
        raise ConfigError(f"{where}: dynamic weight scales are not supported")
    if fmt == "float-quantized" and kind != "float" or fmt == "pack-quantized" and kind != "int":
        raise ConfigError(f"{where}: {kind} weights cannot be stored {fmt}")
    group = r.int("group_size", optional=True) if strategy == "group" else None
    if strategy == "group" and (group is None or group <= 0):
        raise ConfigError(f"{where}: strategy 'group' needs a positive group_size")
    actorder = w.get("actorder")
    if actorder not in (None, False, "group", "weight", "static", "dynamic"):
        raise ConfigError(f"{where}: actorder {actorder!r} is not supported")
    symmetric = r.bool("symmetric", default=True)
    if kind == "float" and (not symmetric or strategy == "group"):
        raise ConfigError(f"{where}: fp8 weights are supported symmetric, per tensor or per channel")
    return WeightScheme(fmt, bits, kind, symmetric, strategy, group, actorder == "group", 0, inputs)


def _ct_inputs(a: Any, where: str) -> ActivationScheme | None:
    if a is None:
        return None
    if not isinstance(a, dict):
        raise ConfigError(f"{where}: field 'input_activations' must be an object or null")
    r = FieldReader(a, f"{where}.input_activations")
    kind, strategy = a.get("type", "int"), a.get("strategy") or "tensor"
    if kind not in ("int", "float") or strategy not in ("tensor", "token"):
        raise ConfigError(f"{where}.input_activations: {kind} per-{strategy} activations are not supported")
    if not r.bool("symmetric", default=True):
        raise ConfigError(f"{where}.input_activations: asymmetric activations are not supported")
    dynamic = a.get("dynamic", False) is True
    return ActivationScheme(kind, r.int("num_bits", default=8), dynamic, strategy)


def _fp8(d: dict[str, Any], source: str) -> QuantizationConfig:
    src = f"{source} (quantization_config)"
    if d.get("weight_block_size") is not None:
        raise ConfigError(f"{src}: block-wise fp8 (weight_block_size) is not supported; per-tensor scales are")
    act = d.get("activation_scheme", "dynamic")
    if act not in ("static", "dynamic"):
        raise ConfigError(f"{src}: activation_scheme {act!r} must be 'static' or 'dynamic'")
    inputs = ActivationScheme("float", 8, act == "dynamic", "tensor" if act == "static" else "token")
    scheme = WeightScheme("fp8", 8, "float", True, "tensor", activations=inputs)
    ignored = _strings(d.get("ignored_layers") or d.get("modules_to_not_convert") or [], f"{src}.ignored_layers")
    # AutoFP8 quantizes every linear but those listed; Mixtral's router gate is never one worth quantizing
    return QuantizationConfig("fp8", source, ((("Linear",), scheme),), tuple(ignored))


def _gptq(d: dict[str, Any], source: str) -> QuantizationConfig:
    src = f"{source} (quantization_config)"
    r = FieldReader(d, src)
    bits, group = r.int("bits"), r.int("group_size", default=-1)
    if bits not in (4, 8):
        raise ConfigError(f"{src}: GPTQ bits {bits} is not supported (4 and 8 are)")
    if group != -1 and group <= 0:
        raise ConfigError(f"{src}: field 'group_size' must be positive or -1, got {group}")
    fmt = d.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{src}: checkpoint_format {fmt!r} is not supported ('gptq' and 'gptq_v2' are)")
    sym = r.bool("sym", default=True)
    r.bool("desc_act", default=False)  # g_idx is stored either way; read to check its type
    strategy = "group" if group > 0 else "channel"
    offset = 1 if fmt == "gptq" else 0
    scheme = WeightScheme("gptq", bits, "int", sym, strategy, group if group > 0 else None, True, offset)
    return QuantizationConfig("gptq", source, ((("Linear",), scheme),), by_files=True)


def _awq(d: dict[str, Any], source: str) -> QuantizationConfig:
    src = f"{source} (quantization_config)"
    r = FieldReader(d, src)
    bits, group = r.int("bits", default=r.int("w_bit", default=4)), r.int("group_size", default=128)
    version = str(d.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not r.bool("zero_point", default=True):
        raise ConfigError(f"{src}: only 4-bit AWQ with zero points in the GEMM layout is supported")
    if group <= 0:
        raise ConfigError(f"{src}: field 'group_size' must be positive, got {group}")
    scheme = WeightScheme("awq", 4, "int", False, "group", group)
    ignored = _strings(d.get("modules_to_not_convert") or [], f"{src}.modules_to_not_convert")
    return QuantizationConfig("awq", source, ((("Linear",), scheme),), tuple(ignored), by_files=True)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return value
