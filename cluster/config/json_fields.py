"""Typed reading of a checkpoint's JSON (``config.json``, ``params.json``, ``quantization_config``): every error names
the file and the field (:class:`~cluster.errors.ConfigError`)."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path
from typing import Any, Literal, overload

from cluster.errors import ConfigError


def require_object(d: Any, source: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level, got {type(d).__name__}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


class FieldReader:
    """Typed field access with errors that name the file and field.

    ``default=None`` (the default) makes a field required; ``optional=True`` makes a missing or null field None.
    """

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d = d
        self.source = source

    def _get(self, name: str, default: object, optional: builtins.bool) -> object:
        if name not in self.d:
            if optional:
                return None
            if default is None:
                raise ConfigError(f"{self.source}: required field {name!r} is missing")
            return default
        return self.d[name]

    @overload
    def int(
        self,
        name: str,
        *,
        default: builtins.int | None = None,
        optional: Literal[False] = False,
        allow_null_default: builtins.bool = False,
    ) -> builtins.int: ...

    @overload
    def int(self, name: str, *, optional: Literal[True]) -> builtins.int | None: ...

    def int(
        self,
        name: str,
        *,
        default: builtins.int | None = None,
        optional: builtins.bool = False,
        allow_null_default: builtins.bool = False,
    ) -> builtins.int | None:
        v = self._get(name, default, optional)
        if v is None:
            if optional:
                return None
            if allow_null_default and default is not None:
                return default
        if isinstance(v, builtins.bool) or not isinstance(v, builtins.int):
            raise ConfigError(f"{self.source}: field {name!r} must be an integer, got {v!r}")
        return v

    def float(self, name: str, *, default: builtins.float | None = None) -> builtins.float:
        v = self._get(name, default, False)
        if isinstance(v, builtins.bool) or not isinstance(v, (builtins.int, builtins.float)) or not math.isfinite(v):
            raise ConfigError(f"{self.source}: field {name!r} must be a finite number, got {v!r}")
        return builtins.float(v)

    def bool(self, name: str, *, default: builtins.bool | None = None) -> builtins.bool:
        v = self._get(name, default, False)
        if not isinstance(v, builtins.bool):
            raise ConfigError(f"{self.source}: field {name!r} must be true or false, got {v!r}")
        return v
