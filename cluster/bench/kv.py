"""The paged KV cache's cases of ``mixserve bench engine``: (c) prefix sharing and (d) capacity.

(c) ``prefix_requests`` requests share a ``prefix_len``-token system prompt, each followed by its own question
(``prefix_question_len`` tokens), all submitted at once; the same run with automatic prefix caching on and off
(two frontends of the same config). Time to first token per request from the engine's own request metrics;
outputs must be identical.
(d) The slot cache this project had gave every sequence ``max_model_len`` positions: ``capacity_slots`` slots of
it hold ``capacity_slots`` sequences. The paged cache gets exactly those bytes (as blocks) and a batch limit that
does not bind; ``capacity_requests`` sequences of ``capacity_len`` tokens are submitted at once and the most that
ever run together is counted.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

from cluster.bench import harness as h
from cluster.config.cluster import ClusterConfig
from cluster.engine.sampling import SamplingParams
from cluster.runtime.frontend import build_frontend


def bench_prefix(o: Any, config: ClusterConfig, run: h.Run) -> dict[str, Any]:
    rng = random.Random(o.seed + 7)
    vocab = 32000
    system = [rng.randrange(3, vocab) for _ in range(o.prefix_len)]
    lo, hi = h.ints(o.prefix_question_len, "prefix-question-len", span=True)
    prompts = [system + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(o.prefix_requests)]
    params = [SamplingParams(max_tokens=o.prefix_new_tokens, temperature=0.0, ignore_eos=True)] * len(prompts)
    sides: dict[str, Any] = {}
    outputs: dict[str, list[list[int]]] = {}
    for caching in (False, True):
        name = "prefix caching" if caching else "no prefix caching"
        run(f"(c) prefix sharing: {len(prompts)} requests with a {o.prefix_len}-token system prompt, {name}")
        fe = build_frontend(config.with_options(enable_prefix_caching=caching), progress=False)
        fe.core.generate(prompts[:1], params[:1])  # warm-up (and, with caching, nothing shared yet: a fresh run)
        fe = build_frontend(config.with_options(enable_prefix_caching=caching), progress=False)
        outs = fe.core.generate(prompts, params)
        ttft = [o.metrics["ttft"] * 1e3 for o in outs]
        stats = fe.core.stats()
        sides[name] = {
            "engine": name,
            "ttft_ms_p50": statistics.median(ttft),
            "ttft_ms_p99": h.percentile(ttft, 99),
            "prefix_cache_hits": stats["prefix_cache_hits"],
            "cached_prompt_tokens": sum(int(o.metrics["cached_tokens"]) for o in outs),
        }
        outputs[name] = [o.token_ids for o in outs]
    off, on = sides["no prefix caching"], sides["prefix caching"]
    return {
        "requests": len(prompts),
        "prefix_len": o.prefix_len,
        "sides": [off, on],
        "ttft_p50_speedup": off["ttft_ms_p50"] / on["ttft_ms_p50"],
        "same_outputs": outputs["prefix caching"] == outputs["no prefix caching"],
    }


def bench_capacity(o: Any, config: ClusterConfig, run: h.Run) -> dict[str, Any]:
    fe = build_frontend(config, progress=False)
    max_len = fe.core.max_model_len
    slots = o.capacity_slots  # what the slot cache could hold in these bytes
    blocks = slots * -(-max_len // config.engine.block_size)
    paged = config.with_options(num_kv_blocks=blocks, max_num_seqs=o.capacity_requests)
    fe = build_frontend(paged, progress=False)
    rng = random.Random(o.seed + 11)
    prompt_len = o.capacity_len // 2
    prompts = [[rng.randrange(3, 32000) for _ in range(prompt_len)] for _ in range(o.capacity_requests)]
    params = SamplingParams(max_tokens=o.capacity_len - prompt_len, temperature=0.0, ignore_eos=True)
    run(f"(d) capacity: {o.capacity_requests} sequences of {o.capacity_len} tokens in {blocks} blocks")
    peak = 0
    core = fe.core
    for i, p in enumerate(prompts):
        core.add_request(f"cap-{i}", p, params)
    while core.has_work():
        core.step()
        peak = max(peak, core.num_running)
    return {
        "kv_cache_bytes": fe.runner.kv.nbytes(),
        "max_model_len": max_len,
        "sequence_tokens": o.capacity_len,
        "slot_cache_sequences": slots,
        "paged_peak_sequences": peak,
        "preemptions": core.stats()["num_preemptions"],
        "ratio": peak / slots,
    }


def goals_of(prefix: dict[str, Any] | None, capacity: dict[str, Any] | None) -> list[dict]:
    out = []
    if prefix is not None:
        text = "prefix sharing: TTFT p50 without / with prefix caching >= 3x (same outputs)"
        note = None if prefix["same_outputs"] else "outputs differ"
        out.append(
            h.goal(text, prefix["ttft_p50_speedup"] if prefix["same_outputs"] else 0.0, 3.0, at_least=True, note=note)
        )
    if capacity is not None:
        text = f"concurrent {capacity['sequence_tokens']}-token sequences in the slot cache's bytes: paged >= 4x slots"
        out.append(h.goal(text, capacity["ratio"], 4.0, at_least=True))
    return out


def tables(prefix: dict[str, Any] | None, capacity: dict[str, Any] | None) -> list[str]:
    out = []
    if prefix is not None:
        cols = ["engine", "ttft_ms_p50", "ttft_ms_p99", "prefix_cache_hits", "cached_prompt_tokens"]
        out.append(h.table(prefix["sides"], cols, title=f"(c) prefix sharing: {prefix['requests']} requests"))
    if capacity is not None:
        cols = ["kv_cache_bytes", "slot_cache_sequences", "paged_peak_sequences", "preemptions", "ratio"]
        out.append(h.table([capacity], cols, title="(d) capacity in the same KV bytes"))
    return out
