"""Strict, role-aware safetensors loading.

A checkpoint folder holds one of:

- ``model.safetensors`` (Hugging Face, one file);
- ``model.safetensors.index.json`` + the shards it names (Hugging Face, sharded);
- ``consolidated*.safetensors`` + ``params.json`` (the original Mistral release).

Whatever the layout, tensors come out under their Hugging Face names (``model.layers.0.self_attn.q_proj.weight``
...). Original Mistral names are renamed, and ``wq``/``wk`` get the rotary row permutation that the Hugging Face
conversion script applies, so an original release is served with no conversion step.

Loading is by role (:class:`LoadRole`): the frontend takes every non-expert tensor, an expert worker only the experts
it is given. Files are memory-mapped (``safe_open``); only the tensors a role needs are read. Strictness: every
tensor in the files is either loaded or skipped on purpose (it belongs to another role); a missing tensor, an
unexpected one, a wrong shape, or a corrupt file raises :class:`CheckpointError` naming the file and the tensor.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from cluster.config.model import ModelConfig
from cluster.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------- roles
@dataclass(frozen=True)
class LoadRole:
    """Which tensors a process loads.

    ``non_expert=True`` takes embeddings, attention, norms, gates and lm_head. ``experts`` is a set of
    ``(layer, expert)`` pairs whose w1/w2/w3 are taken. Everything else is skipped on purpose.
    """

    non_expert: bool = False
    experts: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @classmethod
    def frontend(cls) -> LoadRole:
        return cls(non_expert=True)

    @classmethod
    def expert_shard(cls, experts: Iterable[tuple[int, int]]) -> LoadRole:
        return cls(non_expert=False, experts=frozenset(experts))

    @classmethod
    def everything(cls, config: ModelConfig) -> LoadRole:
        pairs = {(i, e) for i in range(config.num_layers) for e in range(config.num_experts)}
        return cls(non_expert=True, experts=frozenset(pairs))


_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Mixtral checkpoint of this config holds, with its shape."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (config.q_size, d)
        shapes[p + "self_attn.k_proj.weight"] = (config.kv_size, d)
        shapes[p + "self_attn.v_proj.weight"] = (config.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, config.q_size)
        shapes[p + "block_sparse_moe.gate.weight"] = (config.num_experts, d)
        for e in range(config.num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (f, d)
            shapes[q + "w2.weight"] = (d, f)
            shapes[q + "w3.weight"] = (f, d)
    return shapes


def role_wants(role: LoadRole, hf_name: str) -> bool:
    m = _EXPERT_RE.match(hf_name)
    if m:
        return (int(m.group(1)), int(m.group(2))) in role.experts
    return role.non_expert


# ---------------------------------------------------------------------- name mapping
_MISTRAL_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_MISTRAL_TOP["output.weight"] = "lm_head.weight"
_MISTRAL_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_MISTRAL_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_MISTRAL_EXPERT_RE = re.compile(r"^feed_forward\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def mistral_to_hf_name(name: str) -> str | None:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None when unknown."""
    if name in _MISTRAL_TOP:
        return _MISTRAL_TOP[name]
    m = _MISTRAL_LAYER_RE.match(name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    if rest in _MISTRAL_LAYER:
        return f"model.layers.{layer}.{_MISTRAL_LAYER[rest]}"
    e = _MISTRAL_EXPERT_RE.match(rest)
    if e:
        return f"model.layers.{layer}.block_sparse_moe.experts.{e.group(1)}.{e.group(2)}.weight"
    return None


def hf_to_mistral_name(hf_name: str) -> str:
    inverse_top = {v: k for k, v in _MISTRAL_TOP.items()}
    if hf_name in inverse_top:
        return inverse_top[hf_name]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if not m:
        raise KeyError(hf_name)
    layer, rest = m.group(1), m.group(2)
    for mk, hk in _MISTRAL_LAYER.items():
        if rest == hk:
            return f"layers.{layer}.{mk}"
    e = re.match(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$", rest)
    if e:
        return f"layers.{layer}.feed_forward.experts.{e.group(1)}.{e.group(2)}.weight"
    raise KeyError(hf_name)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Original Mistral (interleaved rotary pairs) -> Hugging Face (rotate-half) row order for wq / wk.

    Rows of one head go from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...). Same as the HF conversion
    script's ``permute``.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rotary` (Hugging Face -> original Mistral row order)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------- file discovery
@dataclass(frozen=True)
class CheckpointFiles:
    """Where every stored tensor lives: stored name -> file, and the layout's naming scheme."""

    folder: Path
    layout: str  # "hf" | "mistral"
    tensor_files: dict[str, Path]  # stored tensor name -> file


def discover(folder: str | Path) -> CheckpointFiles:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist")
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    consolidated = sorted(folder.glob("consolidated*.safetensors"))
    if index.is_file():
        return _from_index(folder, index)
    if single.is_file():
        return CheckpointFiles(folder, "hf", {k: single for k in _keys_of(single)})
    if consolidated:
        names: dict[str, Path] = {}
        for f in consolidated:
            for k in _keys_of(f):
                if k in names:
                    raise CheckpointError(f"{f}: tensor {k!r} is stored twice (also in {names[k].name})")
                names[k] = f
        return CheckpointFiles(folder, "mistral", names)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder / pickles[0]}: pickle checkpoints ({', '.join(pickles)}) are not supported; "
            "mixserve loads safetensors only and never unpickles files. Convert with safetensors first."
        )
    raise CheckpointError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or consolidated*.safetensors found"
    )


def _from_index(folder: Path, index: Path) -> CheckpointFiles:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    names: dict[str, Path] = {}
    stored_in: dict[Path, set[str]] = {}
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"{index}: tensor {tensor!r} maps to {fname!r}, not a file name")
        path = folder / fname
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: tensor {tensor!r} is in a pickle file; only safetensors are loaded")
        if Path(fname).name != fname:
            raise CheckpointError(f"{index}: shard name {fname!r} for tensor {tensor!r} must be a plain file name")
        if not path.is_file():
            raise CheckpointError(f"{path}: shard named by the index for tensor {tensor!r} does not exist")
        names[tensor] = path
        stored_in.setdefault(path, set()).add(tensor)
    actual = {path: set(_keys_of(path)) for path in stored_in}
    for path, listed in stored_in.items():
        missing = listed - actual[path]
        if missing:
            raise CheckpointError(f"{path}: tensor {sorted(missing)[0]!r} is named by the index but not in the file")
    for path, listed in stored_in.items():
        unlisted = actual[path] - listed
        if unlisted:
            # Strict coverage: a tensor the index does not map to this file would otherwise be skipped silently.
            raise CheckpointError(
                f"{path}: unexpected tensor {sorted(unlisted)[0]!r} (in the file but not mapped to it by {index.name})"
            )
    return CheckpointFiles(folder, "hf", names)


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(_unreadable(path, e)) from None


def _unreadable(path: Path, error: Exception) -> str:
    """Error text for a file safetensors refuses; names the first tensor cut off when the file is truncated."""
    msg = f"{path}: not a readable safetensors file ({error})"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + n > size:
                return msg
            header = json.loads(fh.read(n))
        ends = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
        cut = [k for end, k in ends if end > size - 8 - n]
    except Exception:  # not even a parseable header: the file is all we can name
        return msg
    if cut:
        msg += f"; tensor {cut[0]!r} lies past the end of the file (truncated, {size} bytes)"
    return msg


# ---------------------------------------------------------------------- loading
class _LogLines:
    """A file for tqdm when stderr is not a terminal (Ray's log files): each redraw becomes one whole line,
    instead of carriage returns that pile up into one unreadable line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _progress(total: int, label: str, enabled: bool) -> tqdm:
    """A tqdm bar over the tensors this process loads, with the bytes so far: one line per process, redrawn in place
    on a terminal, a line every 10 s (and the last one) in a log file such as Ray's."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=f"[mixserve] loading {label}",
        bar_format="{desc}: {n_fmt}/{total_fmt} tensors{postfix} |{bar:20}| {elapsed}",
        postfix="0.0 MiB",
        file=sys.stderr if tty else _LogLines(sys.stderr),
        mininterval=0.5 if tty else 10.0,
        leave=True,
        disable=not enabled,
    )


def load_tensors(
    folder: str | Path,
    config: ModelConfig,
    *,
    role: LoadRole,
    dtype: str | torch.dtype = "float32",
    progress: bool = True,
    label: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Load the tensors ``role`` needs, under Hugging Face names, converted to ``dtype``.

    Example: ``load_tensors(d, cfg, role=LoadRole.expert_shard({(0, 0), (0, 1)}))`` returns only the six tensors
    ``model.layers.0.block_sparse_moe.experts.{0,1}.{w1,w2,w3}.weight``.
    """
    torch_dtype = parse_dtype(dtype)
    outside = sorted(
        (layer, e) for layer, e in role.experts if not (0 <= layer < config.num_layers and 0 <= e < config.num_experts)
    )
    if outside:
        raise CheckpointError(
            f"{folder}: role asks for (layer, expert) {outside[0]}, but the model has "
            f"{config.num_layers} layers of {config.num_experts} experts"
        )
    files = discover(folder)
    shapes = expected_shapes(config)

    # stored name -> hf name, with strict coverage of what the files hold.
    plan: dict[str, tuple[str, Path]] = {}
    present: set[str] = set()
    for stored, path in files.tensor_files.items():
        hf = stored if files.layout == "hf" else mistral_to_hf_name(stored)
        if hf is None or (hf not in shapes and not (hf == "lm_head.weight" and config.tie_word_embeddings)):
            raise CheckpointError(f"{path}: unexpected tensor {stored!r} (not part of a {_describe(config)} model)")
        if hf in present:
            raise CheckpointError(f"{path}: tensor {stored!r} is stored twice")
        plan[stored] = (hf, path)
        present.add(hf)
    for hf in shapes:
        if hf not in present:
            where = files.folder
            raise CheckpointError(f"{where}: tensor {_stored_name(hf, files.layout)!r} is missing from the checkpoint")

    wanted = {s: (hf, p) for s, (hf, p) in plan.items() if role_wants(role, hf) and hf in shapes}
    by_file: dict[Path, list[str]] = {}
    for stored, (_, path) in wanted.items():
        by_file.setdefault(path, []).append(stored)

    out: dict[str, torch.Tensor] = {}
    bar = _progress(len(wanted), label, progress and len(wanted) > 0)
    loaded = 0
    for path, stored_names in sorted(by_file.items()):
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:
            raise CheckpointError(_unreadable(path, e)) from None
        with handle as f:
            for stored in stored_names:
                hf = wanted[stored][0]
                try:
                    t = f.get_tensor(stored)
                except Exception as e:
                    raise CheckpointError(f"{path}: tensor {stored!r} cannot be read ({e})") from None
                if not t.is_floating_point():
                    raise CheckpointError(f"{path}: tensor {stored!r} has dtype {t.dtype}; expected a float type")
                if tuple(t.shape) != shapes[hf]:
                    raise CheckpointError(
                        f"{path}: tensor {stored!r} has shape {tuple(t.shape)}, expected {shapes[hf]} for this config"
                    )
                if files.layout == "mistral" and hf.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                    heads = config.num_heads if "q_proj" in hf else config.num_kv_heads
                    t = permute_rotary(t, heads)
                t = t.to(torch_dtype).contiguous()
                out[hf] = t
                loaded += t.numel() * t.element_size()
                bar.set_postfix_str(f"{loaded / 2**20:.1f} MiB", refresh=False)
                bar.update(1)
    bar.close()
    return out


def _describe(config: ModelConfig) -> str:
    return f"{config.num_layers}-layer, {config.num_experts}-expert Mixtral"


def _stored_name(hf: str, layout: str) -> str:
    return hf if layout == "hf" else hf_to_mistral_name(hf)


def checkpoint_nbytes(folder: str | Path) -> int:
    """Total bytes of the safetensors files of a checkpoint."""
    files = discover(folder)
    return sum(p.stat().st_size for p in set(files.tensor_files.values()))
