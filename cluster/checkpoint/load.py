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

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from cluster.checkpoint.files import CheckpointFiles, discover, unreadable
from cluster.checkpoint.names import hf_to_mistral_name, mistral_to_hf_name, permute_rotary
from cluster.checkpoint.progress import progress_bar
from cluster.checkpoint.quant.read import iter_modules
from cluster.checkpoint.quant.weights import QuantWeight
from cluster.checkpoint.roles import LoadRole, expected_shapes, role_wants
from cluster.config.model import ModelConfig
from cluster.errors import CheckpointError

__all__ = ["LoadRole", "expected_shapes", "iter_weights", "load_tensors", "parse_dtype", "role_wants"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_tensors(
    folder: str | Path,
    config: ModelConfig,
    *,
    role: LoadRole,
    dtype: str | torch.dtype = "float32",
    progress: bool = True,
    label: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Load the tensors ``role`` needs, under Hugging Face names, converted to ``dtype`` (quantized modules
    dequantized exactly, in float32, first: ``cluster.checkpoint.quant``).

    Example: ``load_tensors(d, cfg, role=LoadRole.expert_shard({(0, 0), (0, 1)}))`` returns only the six tensors
    ``model.layers.0.block_sparse_moe.experts.{0,1}.{w1,w2,w3}.weight``.
    """
    torch_dtype = parse_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for hf, w in iter_weights(folder, config, role=role, progress=progress, label=label):
        t = w if isinstance(w, torch.Tensor) else w.dequantize()
        out[hf] = t.to(torch_dtype).contiguous()
    return out


def iter_weights(
    folder: str | Path, config: ModelConfig, *, role: LoadRole, progress: bool = True, label: str = "checkpoint"
) -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
    """The tensors ``role`` needs, under Hugging Face names, as stored: dense tensors in the checkpoint's dtype, and
    quantized modules as :class:`IntWeight` / :class:`FloatWeight` (never a dense copy). The whole checkpoint is
    checked (strict coverage, see the module docstring) before the first tensor is read."""
    _check_role(folder, config, role)
    if config.quantization is not None:
        count, weights = iter_modules(folder, config, role)
    else:
        count, weights = _dense(folder, config, role)
    bar = progress_bar(count, label, progress and count > 0)
    loaded = 0
    for hf, w in weights:
        loaded += w.nbytes() if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()
        bar.set_postfix_str(f"{loaded / 2**20:.1f} MiB", refresh=False)
        bar.update(1)
        yield hf, w
    bar.close()


def _dense(
    folder: str | Path, config: ModelConfig, role: LoadRole
) -> tuple[int, Iterator[tuple[str, torch.Tensor | QuantWeight]]]:
    files = discover(folder)
    shapes = expected_shapes(config)
    plan = _name_plan(files, config, shapes)
    wanted = {s: (hf, p) for s, (hf, p) in plan.items() if role_wants(role, hf) and hf in shapes}
    by_file: dict[Path, list[str]] = {}
    for stored, (_, path) in wanted.items():
        by_file.setdefault(path, []).append(stored)

    def tensors() -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
        for path, stored_names in sorted(by_file.items()):
            for stored, t in _read(path, stored_names):
                hf = wanted[stored][0]
                t = _checked(t, path=path, stored=stored, want=shapes[hf])
                if files.layout == "mistral" and hf.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                    t = permute_rotary(t, config.num_heads if "q_proj" in hf else config.num_kv_heads)
                yield hf, t

    return len(wanted), tensors()


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
