"""Command-line flags generated from a config class, so every option is declared once.

:func:`add_options` turns the fields of a pydantic model or a dataclass into ``--flag`` arguments (type, default,
choices and help taken from the field); :func:`options_from` reads them back as keyword arguments for that class.
A composed config (``cluster.config.cluster.Composed``: ``ClusterConfig``, the Serve ``AppArgs``) gives the flags of
all its parts. Supported field types: int, float, str (its choices from ``json_schema_extra={"choices": [...]}``),
bool, Literal choices, Path, and any of them ``| None`` (the flag then also
takes ``none``); ``list[X]`` of one of the scalar types takes one or more values and may be repeated
(``--key a b --key c``), and leaves the config's own default alone when not given. Fields of other types are left off
the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _fields(cls: type) -> list[tuple[str, Any, Any, str, list[Any] | None]]:
    """(name, annotation, default, help, choices) of each field; a composed config (``cluster.config.cluster.
    Composed``) lists its parts' fields, flat, with its own ``DEFAULTS``."""
    parts = getattr(cls, "parts", None)
    if parts is not None:
        defaults = getattr(cls, "DEFAULTS", {})
        return [
            (name, annotation, defaults.get(name, default), help_text, choices)
            for part in parts().values()
            for name, annotation, default, help_text, choices in _fields(part)
        ]
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        out = []
        for name, f in cls.model_fields.items():
            default = f.default if f.default is not PydanticUndefined else None
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            choices = extra.get("choices")
            listed = list(choices) if isinstance(choices, list | tuple) else None
            out.append((name, f.annotation, default, f.description or "", listed))
        return out
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, hints[f.name], default, f.metadata.get("help", ""), None))
    return out


def _list_item(annotation: Any) -> Any:
    """The item type of ``list[X]`` (X a supported scalar type other than bool), else None."""
    if typing.get_origin(annotation) is not list:
        return None
    (item,) = typing.get_args(annotation) or (None,)
    kind, _, optional = _parser_of(item)
    return item if kind not in (None, bool) and not optional else None


def _parser_of(annotation: Any) -> tuple[Callable[[str], Any] | None, list[Any] | None, bool]:
    """(argparse type, choices, optional) for a scalar annotation; type None means not on the command line."""
    optional = False
    if typing.get_origin(annotation) is typing.Annotated:  # e.g. StrictInt
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None, None, optional
        annotation = rest[0]
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices, optional
    if annotation in (int, float, str, bool, Path):
        return annotation, None, optional
    return None, None, optional


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind``, except that ``none`` / ``null`` give None."""

    def convert(s: str) -> Any:
        return None if s.lower() in ("none", "null") else kind(s)

    return convert


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> None:
    """One ``--field-name`` flag per supported field of ``cls`` (``skip`` leaves fields out)."""
    skipped = set(skip)
    for name, annotation, default, help_text, listed in _fields(cls):
        if name in skipped:
            continue
        flag = "--" + name.replace("_", "-")
        shown = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        item = _list_item(annotation)
        if item is not None:  # None when not given: options_from then leaves the field to its own default
            kind, choices, _ = _parser_of(item)
            assert kind is not None  # _list_item checked it
            shown = f"{shown}; one of {', '.join(map(str, choices))}" if choices else shown
            parser.add_argument(flag, type=kind, nargs="+", action="extend", default=None, help=shown, dest=name)
            continue
        kind, choices, optional = _parser_of(annotation)
        if kind is None:
            continue
        choices = choices or listed
        if choices:  # listed here; the config class validates (and may normalise) the value
            shown = f"{shown}; one of {', '.join(map(str, choices))}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        convert = _or_none(kind) if optional else kind
        parser.add_argument(flag, type=convert, default=default, help=shown, dest=name)


def options_from(ns: argparse.Namespace, cls: type, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The values of ``cls``'s flags from a parsed namespace (a list flag that was not given is left out)."""
    skipped = set(skip)
    out = {}
    for name, annotation, _, _, _ in _fields(cls):
        if name in skipped or not hasattr(ns, name):
            continue
        if _list_item(annotation) is not None:
            if getattr(ns, name) is not None:
                out[name] = getattr(ns, name)
        elif _parser_of(annotation)[0] is not None:
            out[name] = getattr(ns, name)
    return out
