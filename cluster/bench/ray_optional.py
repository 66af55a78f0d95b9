"""Subcommands that need Ray, on a machine where Ray is not installed.

``mixserve serve`` and the benchmarks with expert workers import Ray; ``tiny-model``, ``generate`` and ``bench
engine`` at W = 0 must run without it (a GPU box with only torch, for instance). :func:`add_or_explain` registers such
a subcommand as usual where its module imports; where the import fails for want of Ray, the subcommand is still
listed and, whatever its flags (``takes_any_flags``: ``cluster.cli.main`` lets them through), says what it needs and
exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

RAY_MISSING = "needs Ray, which is not installed here (pip install 'ray[serve]'): {error}"


def is_missing_ray(error: ImportError) -> bool:
    """Whether the import failed because ``ray`` (or a part of it) is not installed."""
    return (error.name or "").partition(".")[0] == "ray"


def add_or_explain(
    sub: argparse._SubParsersAction, name: str, register: Callable[[argparse._SubParsersAction], None]
) -> None:
    """``register(sub)`` (it imports the subcommand's module and adds its parser); where that import needs a Ray that
    is not installed, a ``name`` subcommand that prints so and returns 2."""
    try:
        register(sub)
    except ImportError as e:
        if not is_missing_ray(e):
            raise
        message = RAY_MISSING.format(error=e)
        p = sub.add_parser(name, help=f"({message})", description=message)
        p.set_defaults(func=_explain(p.prog, message), takes_any_flags=True)  # its own flags are not known here


def _explain(prog: str, message: str) -> Callable[[argparse.Namespace], int]:
    def main(_: argparse.Namespace) -> int:
        print(f"{prog}: {message}", file=sys.stderr)
        return 2

    return main
