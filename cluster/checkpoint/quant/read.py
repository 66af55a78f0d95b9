"""Reading a quantized checkpoint's modules: each module's stored parts (memory-mapped, only the ones asked for),
checked against its scheme and assembled into a dense tensor (modules stored dense) or an :class:`IntWeight` /
:class:`FloatWeight` (modules stored quantized), never a dense copy of those."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from cluster.checkpoint.files import discover, unreadable
from cluster.checkpoint.quant.formats import assemble
from cluster.checkpoint.quant.plan import ModuleParts, quantized_plan
from cluster.checkpoint.quant.weights import QuantWeight
from cluster.checkpoint.roles import LoadRole, expected_shapes, role_wants
from cluster.config.model import ModelConfig
from cluster.errors import CheckpointError


class Reader:
    """One open safetensors handle per file, for reading single tensors in any order."""

    def __init__(self) -> None:
        self._handles: dict[Path, Any] = {}
        self._stack = ExitStack()

    def get(self, path: Path, name: str) -> torch.Tensor:
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:
                raise CheckpointError(unreadable(path, e)) from None
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e})") from None

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_module(reader: Reader, m: ModuleParts) -> torch.Tensor | QuantWeight:
    """The module's stored parts, checked (dtype, shape) -> its dense tensor or quantized form."""
    tensors = {}
    for suffix, (name, path) in m.stored.items():
        t = reader.get(path, name)
        m.specs[suffix].check(t, where=f"{path}: tensor {name!r}")
        tensors[suffix] = t
    if m.scheme is None:
        return tensors["weight"]
    first = next(iter(m.stored.values()))
    where = f"{first[1]}: module {m.name.removesuffix('.weight')!r}"
    return assemble(m.scheme, tensors, m.shape[0], m.shape[1], where=where)


def iter_modules(
    folder: str | Path, config: ModelConfig, role: LoadRole
) -> tuple[int, Iterator[tuple[str, torch.Tensor | QuantWeight]]]:
    """(how many, the modules ``role`` needs of a quantized checkpoint as (Hugging Face weight name, dense tensor or
    quantized form)); the whole checkpoint is checked (strict coverage) before the first one is read."""
    plan = quantized_plan(discover(folder), config, expected_shapes(config))
    wanted = [m for hf, m in plan.items() if role_wants(role, hf)]

    def modules() -> Iterator[tuple[str, torch.Tensor | QuantWeight]]:
        with Reader() as reader:
            for m in wanted:
                yield m.name, read_module(reader, m)

    return len(wanted), modules()
