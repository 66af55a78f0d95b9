"""``mixserve bench``: engine, dispatch, sharded, serve, memory, reload, soak and straggler benchmarks (not part of the
test suite).

Each subcommand prints a table, shows progress on stderr and writes a JSON report (``--out``, default
``bench-results/<name>-<timestamp>.json``) with the machine, versions, settings, method, results and goals
(``cluster.bench.harness``). ``engine`` and ``reload`` run in-process and need no Ray; the others do, and where Ray is
not installed they only say so (``cluster.bench.ray_optional``).
"""

from __future__ import annotations

import argparse
import functools
import importlib

from cluster.bench.harness import add_command
from cluster.bench.ray_optional import add_or_explain

BENCHES = ("engine", "dispatch", "sharded", "serve", "memory", "reload", "soak", "straggler")
# The module whose Options and run a subcommand uses, where it is not the subcommand's own: serve_pools runs
# ``serve --frontend-replicas`` and hands every other ``serve`` run to ``cluster.bench.serve.run``; straggler_served
# runs ``straggler --served`` and hands the offline runs to ``cluster.bench.straggler.run``.
ENTRY = {"serve": "serve_pools", "straggler": "straggler_served"}


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its subcommands on the ``mixserve`` parser."""
    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES))
    bench_sub = p.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        add_or_explain(bench_sub, name, functools.partial(_register, name))


def _register(name: str, sub: argparse._SubParsersAction) -> None:
    module = importlib.import_module(f"cluster.bench.{ENTRY.get(name, name)}")
    add_command(sub, name, module.Options, module.run)
