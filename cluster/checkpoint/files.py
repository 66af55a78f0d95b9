"""Which files of a checkpoint folder hold which tensors (:func:`discover`), read from the safetensors headers only.

A folder holds one of: ``model.safetensors`` (Hugging Face, one file); ``model.safetensors.index.json`` + the shards
it names (Hugging Face, sharded); ``consolidated*.safetensors`` + ``params.json`` (the original Mistral release).
Pickle files are refused, never opened; an index that does not match its shards, a tensor stored twice or a
truncated file is a :class:`~cluster.errors.CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from cluster.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        raise CheckpointError(unreadable(path, e)) from None


def unreadable(path: Path, error: Exception) -> str:
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


def checkpoint_nbytes(folder: str | Path) -> int:
    """Total bytes of the safetensors files of a checkpoint."""
    files = discover(folder)
    return sum(p.stat().st_size for p in set(files.tensor_files.values()))
