"""Strict, role-aware safetensors loading.

Whatever the layout of the folder (``cluster.checkpoint.files``), tensors come out under their Hugging Face names
(``model.layers.0.self_attn.q_proj.weight`` ...). Original Mistral names are renamed (``cluster.checkpoint.names``),
and ``wq``/``wk`` get the rotary row permutation that the Hugging Face conversion script applies, so an original
release is served with no conversion step.

Loading is by role (:class:`LoadRole`): the frontend takes every non-expert tensor, an expert worker only the experts
it is given. Files are memory-mapped (``safe_open``); only the tensors a role needs are read. Strictness: every
tensor in the files is either loaded or skipped on purpose (it belongs to another role); a missing tensor, an
unexpected one, a wrong shape, or a corrupt file raises :class:`CheckpointError` naming the file and the tensor.
Nothing is ever unpickled.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from cluster.checkpoint.files import CheckpointFiles, discover, unreadable
from cluster.checkpoint.names import hf_to_mistral_name, mistral_to_hf_name, permute_rotary
from cluster.config.model import ModelConfig
from cluster.errors import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


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
    _check_role(folder, config, role)
    files = discover(folder)
    shapes = expected_shapes(config)
    plan = _name_plan(files, config, shapes)
    wanted = {s: (hf, p) for s, (hf, p) in plan.items() if role_wants(role, hf) and hf in shapes}
    by_file: dict[Path, list[str]] = {}
    for stored, (_, path) in wanted.items():
        by_file.setdefault(path, []).append(stored)
    out: dict[str, torch.Tensor] = {}
    bar = _progress(len(wanted), label, progress and len(wanted) > 0)
    loaded = 0
    for path, stored_names in sorted(by_file.items()):
        for stored, t in _read(path, stored_names):
            hf = wanted[stored][0]
            t = _checked(t, path=path, stored=stored, want=shapes[hf])
            if files.layout == "mistral" and hf.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                t = permute_rotary(t, config.num_heads if "q_proj" in hf else config.num_kv_heads)
            out[hf] = t = t.to(torch_dtype).contiguous()
            loaded += t.numel() * t.element_size()
            bar.set_postfix_str(f"{loaded / 2**20:.1f} MiB", refresh=False)
            bar.update(1)
    bar.close()
    return out


def _check_role(folder: str | Path, config: ModelConfig, role: LoadRole) -> None:
    outside = sorted(
        (layer, e) for layer, e in role.experts if not (0 <= layer < config.num_layers and 0 <= e < config.num_experts)
    )
    if outside:
        raise CheckpointError(
            f"{folder}: role asks for (layer, expert) {outside[0]}, but the model has "
            f"{config.num_layers} layers of {config.num_experts} experts"
        )


def _name_plan(
    files: CheckpointFiles, config: ModelConfig, shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[str, Path]]:
    """Stored name -> (Hugging Face name, file), with strict coverage: every stored tensor belongs to the model
    (once), and every tensor of the model is stored."""
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
            raise CheckpointError(
                f"{files.folder}: tensor {_stored_name(hf, files.layout)!r} is missing from the checkpoint"
            )
    return plan


def _read(path: Path, stored_names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one safetensors file (memory-mapped; only these are read)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:
        raise CheckpointError(unreadable(path, e)) from None
    with handle as f:
        for stored in stored_names:
            try:
                yield stored, f.get_tensor(stored)
            except Exception as e:
                raise CheckpointError(f"{path}: tensor {stored!r} cannot be read ({e})") from None


def _checked(t: torch.Tensor, *, path: Path, stored: str, want: tuple[int, ...]) -> torch.Tensor:
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: tensor {stored!r} has dtype {t.dtype}; expected a float type")
    if tuple(t.shape) != want:
        raise CheckpointError(f"{path}: tensor {stored!r} has shape {tuple(t.shape)}, expected {want} for this config")
    return t


def _describe(config: ModelConfig) -> str:
    return f"{config.num_layers}-layer, {config.num_experts}-expert Mixtral"


def _stored_name(hf: str, layout: str) -> str:
    return hf if layout == "hf" else hf_to_mistral_name(hf)
