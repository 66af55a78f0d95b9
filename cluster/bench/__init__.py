"""``mixserve bench``: engine, dispatch, sharded, serve, memory, reload and soak benchmarks (not part of the test
suite).

Each subcommand prints a table, shows progress on stderr and writes a JSON report (``--out``, default
``bench-results/<name>-<timestamp>.json``) with the machine, versions, settings, method, results and goals
(``cluster.bench.harness``).
"""

from __future__ import annotations

import argparse

from cluster.bench import dispatch, engine, memory, reload, serve, sharded, soak
from cluster.bench.harness import add_command


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its subcommands on the ``mixserve`` parser."""
    p = sub.add_parser("bench", help="benchmarks: engine, dispatch, sharded, serve, memory, reload, soak")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    commands = (
        ("engine", engine),
        ("dispatch", dispatch),
        ("sharded", sharded),
        ("serve", serve),
        ("memory", memory),
        ("reload", reload),
        ("soak", soak),
    )
    for name, module in commands:
        add_command(bench_sub, name, module.Options, module.run)
