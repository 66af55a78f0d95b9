"""The ``mixserve`` command: tiny-model, generate, serve, bench.

``tiny-model``, ``generate`` and ``bench engine`` at W = 0 run where Ray is not installed; there ``serve`` and the Ray
benchmarks only say that they need it (``cluster.bench.ray_optional``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

from cluster.bench import add_bench_command
from cluster.bench.ray_optional import add_or_explain
from cluster.checkpoint.tiny_model import BENCH_SPEC, TinyModelSpec, default_model_dir, write_tiny_model
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ConfigError
from cluster.config.options import add_options, options_from
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.sampling import SamplingParams
from cluster.errors import MixserveError
from cluster.llm import LLM
from cluster.runtime.frontend import build_frontend
from cluster.text.tokenizer import Tokenizer

# Config fields that are not command-line flags here: the model is its own flag, a placement map is no flag.
_NOT_FLAGS = ("model", "expert_placement")


def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a small random-weight checkpoint (Hugging Face layout + tokenizer)")
    p.add_argument("dir", type=Path)
    add_options(p, TinyModelSpec)  # --layers, --hidden, ..., --sliding-window N|none: the spec's fields
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--format", choices=["hf", "mistral"], default="hf", help="hf, or the original Mistral layout")
    p.add_argument("--bench", action="store_true", help="the benchmark size (hidden 512, 4 layers, 8 experts)")


def _tiny_model(a: argparse.Namespace) -> int:
    spec = BENCH_SPEC if a.bench else TinyModelSpec(**options_from(a, TinyModelSpec))
    try:
        config = spec.config()
    except ConfigError as e:
        print(f"mixserve tiny-model: {e}", file=sys.stderr)
        return 2
    if config.vocab_size < 32000:
        print("mixserve tiny-model: --vocab must be >= 32000 to hold the Mixtral tokenizer", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype)
    write_tiny_model(a.dir, spec, seed=a.seed, shards=a.shards, fmt=a.format, dtype=dtype)
    n = config.non_expert_param_count() + config.num_layers * config.num_experts * config.expert_param_count()
    print(f"wrote {a.format} checkpoint to {a.dir} ({n / 1e6:.1f}M parameters, {a.shards} shard(s))")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt, streamed to the terminal")
    p.add_argument("prompt")
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Mistral instruct format")
    add_options(p, ClusterConfig, skip=_NOT_FLAGS)


def _generate(a: argparse.Namespace) -> int:
    """Every error a user can cause (bad flag value, bad checkpoint, bad prompt, lost worker) is one line, exit 2."""
    try:
        return _generate_or_raise(a)
    except MixserveError as e:
        print(f"mixserve generate: {e}", file=sys.stderr)
        return 2


def _generate_or_raise(a: argparse.Namespace) -> int:
    options = options_from(a, ClusterConfig, skip=_NOT_FLAGS)
    config = ClusterConfig.create(model=str(a.model or default_model_dir()), **options)  # names a bad flag
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        stop=tuple(a.stop),
    )
    if config.parallel.expert_workers:  # sharded: the offline API over Ray, printed when done
        with LLM(str(config.load.model), **options) as llm:
            out = llm.generate([_prompt_ids(llm.tokenizer, a)], params)[0]
            print(out.text)
        print(f"[finish_reason={out.finish_reason}]", file=sys.stderr)
        return 0
    frontend = build_frontend(config)
    ids = _prompt_ids(frontend.tokenizer, a)
    engine = AsyncEngine(frontend.core)

    async def run() -> str | None:
        stream = await engine.generate(ids, params)
        reason = None
        async for out in stream:
            if out.error is not None:
                raise out.error
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            reason = out.finish_reason
        sys.stdout.write("\n")
        return reason

    try:
        reason = asyncio.run(run())
    finally:
        engine.shutdown()
    print(f"[finish_reason={reason}]", file=sys.stderr)
    return 0


def _prompt_ids(tok: Tokenizer, a: argparse.Namespace) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": a.prompt}]) if a.chat else tok.encode(a.prompt)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from cluster.serve.cli import add_serve_command  # imports Ray: only for `mixserve serve`

    add_serve_command(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixserve", description=(__doc__ or "").partition("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny_model(sub)
    _add_generate(sub)
    add_or_explain(sub, "serve", _add_serve)
    add_bench_command(sub)
    a, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(a, "takes_any_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(a.func(a)) if hasattr(a, "func") else {"tiny-model": _tiny_model, "generate": _generate}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
