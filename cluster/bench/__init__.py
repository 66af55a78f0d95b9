"""``mixserve bench``: engine, dispatch, serve and memory benchmarks (not part of the test suite).

Each subcommand prints a table, shows progress on stderr and writes a JSON report (``--out``, default
``bench-results/<name>-<timestamp>.json``) with the machine, versions, settings, method, results and goals.
"""

from __future__ import annotations

import argparse


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its subcommands on the ``mixserve`` parser."""
    from cluster.bench import dispatch, engine, memory, serve

    p = sub.add_parser("bench", help="benchmarks: engine, dispatch, serve, memory")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    engine.add_parser(bench_sub)
    dispatch.add_parser(bench_sub)
    serve.add_parser(bench_sub)
    memory.add_parser(bench_sub)
