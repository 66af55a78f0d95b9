"""``mixserve bench engine``: the in-process engine (W = 0) against transformers' ``MixtralForCausalLM.generate`` on
the same checkpoint (float32, CPU, greedy), beside the matrix-product floor of a decode step.

(a) fixed batches (default 1 and 8), equal output lengths: tokens/s, decode-step time, step / floor.
(b) a mixed workload: our continuous batching (everything submitted at once) against transformers in static,
    left-padded batches of 8; useful output tokens/s of both.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cluster.bench import common

# ---------------------------------------------------------------------- settings and workloads


@dataclass(frozen=True)
class EngineBenchSettings:
    model: str
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: int = 64
    prompt_len: int = 16
    repeats: int = 2
    floor_iters: int = 20
    mixed_requests: int = 32
    mixed_prompt_len: tuple[int, int] = (8, 256)
    mixed_max_tokens: tuple[int, int] = (16, 128)
    hf_batch: int = 8
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 1024
    seed: int = 0
    skip_mixed: bool = False
    hf_experts_implementation: str | None = None


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """One prompt per length, of random token ids in [3, vocab) (no UNK/BOS/EOS)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def mixed_workload(
    count: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], vocab: int, seed: int
) -> list[tuple[list[int], int]]:
    """``count`` (prompt, max_tokens) pairs, both lengths uniform in their inclusive ranges."""
    rng = random.Random(seed)
    lengths = [rng.randint(*prompt_len) for _ in range(count)]
    budgets = [rng.randint(*max_tokens) for _ in range(count)]
    return list(zip(random_prompts(lengths, vocab, seed + 1), budgets, strict=True))


# ---------------------------------------------------------------------- our engine
_ids = itertools.count()


class ExpertCounter:
    """Wraps an ExpertClient; records the distinct experts hit per layer in steps of exactly ``tokens`` tokens."""

    def __init__(self, inner: Any, tokens: int) -> None:
        self.inner = inner
        self.tokens = tokens
        self.hits: list[int] = []

    def run_layer(self, layer: int, x: torch.Tensor, messages: list) -> list[torch.Tensor]:
        if x.shape[0] == self.tokens and messages:
            self.hits.append(int(torch.unique(torch.cat([m.experts for m in messages])).numel()))
        return self.inner.run_layer(layer, x, messages)


def load_ours(s: EngineBenchSettings) -> Any:
    from cluster.engine import EngineConfig
    from workers.frontend import Frontend

    engine = EngineConfig(
        max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens, max_model_len=s.max_model_len
    )
    return Frontend(model=s.model, dtype="float32", engine=engine, device="cpu", progress=False)


def drive(core: Any, requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    """Submit every request at once, step the core until all finish. Greedy, EOS ignored.

    Returns total seconds, each step's seconds and the output token ids in request order.
    """
    from cluster.sampling import SamplingParams

    ids = [f"bench-{next(_ids)}" for _ in requests]
    t0 = time.perf_counter()
    for rid, (prompt, n) in zip(ids, requests, strict=True):
        core.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    steps: list[float] = []
    final: dict[str, list[int]] = {}
    while len(final) < len(ids):
        ts = time.perf_counter()
        outs = core.step()
        steps.append(time.perf_counter() - ts)
        for o in outs:
            if o.finished:
                final[o.request_id] = o.token_ids
    total = time.perf_counter() - t0
    return {"total_s": total, "step_s": steps, "tokens": [final[r] for r in ids]}


def count_experts(frontend: Any, prompts: list[list[int]], new_tokens: int) -> list[int]:
    """One (untimed, warm-up) run with the expert client wrapped: distinct experts per layer per decode step."""
    runner = frontend.runner
    counter = ExpertCounter(runner.experts, len(prompts))
    runner.experts = counter
    try:
        drive(frontend.core, [(p, new_tokens) for p in prompts])
    finally:
        runner.experts = counter.inner
    return counter.hits


# ---------------------------------------------------------------------- transformers
def load_hf(s: EngineBenchSettings) -> Any:
    from transformers import MixtralForCausalLM

    kw: dict[str, Any] = {"dtype": torch.float32}
    if s.hf_experts_implementation:
        kw["experts_implementation"] = s.hf_experts_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MixtralForCausalLM.from_pretrained(s.model, **kw).eval()


def hf_settings(model: Any) -> dict[str, Any]:
    cfg = model.config
    return {
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "experts_implementation": getattr(cfg, "_experts_implementation", None),
        "dtype": str(model.dtype),
    }


class _StepClock:
    """A logits processor that only records when it is called: once per generated token (per step)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int = 0) -> dict[str, Any]:
    """Greedy generate on a left-padded batch, exactly ``new_tokens`` each (min_new_tokens = max_new_tokens).

    Returns total seconds, per-step seconds (gaps between successive steps) and output ids per row.
    """
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
    total = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(clock.stamps)]
    return {"total_s": total, "step_s": steps, "tokens": out[:, width:].tolist()}


# ---------------------------------------------------------------------- the floor
@dataclass
class FloorWeights:
    """The matrices a step reads, from the checkpoint itself: per layer q, k, v, o, gate; per (layer, expert)
    the fused [w1; w3] and w2; lm_head."""

    layers: list[dict[str, torch.Tensor]]
    experts: list[list[tuple[torch.Tensor, torch.Tensor]]]
    lm_head: torch.Tensor

    @classmethod
    def load(cls, model: str) -> FloorWeights:
        from cluster.checkpoint import LoadRole, load_tensors
        from cluster.config import ModelConfig

        cfg = ModelConfig.from_dir(model)
        t = load_tensors(model, cfg, role=LoadRole.everything(cfg), dtype=torch.float32, progress=False)
        layers, experts = [], []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            layers.append({k: t[p + f"self_attn.{k}_proj.weight"] for k in ("q", "k", "v", "o")})
            layers[-1]["gate"] = t[p + "block_sparse_moe.gate.weight"]
            row = []
            for e in range(cfg.num_experts):
                q = p + f"block_sparse_moe.experts.{e}."
                w13 = torch.cat((t.pop(q + "w1.weight"), t.pop(q + "w3.weight")), dim=0)
                row.append((w13, t.pop(q + "w2.weight")))
            experts.append(row)
        head = t["model.embed_tokens.weight"] if cfg.tie_word_embeddings else t["lm_head.weight"]
        return cls(layers=layers, experts=experts, lm_head=head)


def split_hits(total: int, layers: int) -> list[int]:
    """Spread ``total`` expert hits over ``layers`` layers as evenly as possible (earlier layers take the extra)."""
    base, extra = divmod(total, layers)
    return [base + (1 if i < extra else 0) for i in range(layers)]


def floor_pass(fw: FloorWeights, batch: int, rows_per_expert: int, hits: list[int]) -> Callable[[], None]:
    """One pass of a decode step's matrix products and nothing else: [B, D] against q, k, v, gate and lm_head,
    [B, q] against o, and [r, D] / [r, F] against ``hits[l]`` experts' w13 / w2 in layer l. The experts used
    rotate from pass to pass, as real steps hit different experts."""
    d = fw.lm_head.shape[1]
    q_size = fw.layers[0]["o"].shape[1]
    f = fw.experts[0][0][1].shape[1]
    g = torch.Generator().manual_seed(0)
    x, xo = torch.randn(batch, d, generator=g), torch.randn(batch, q_size, generator=g)
    xe, xf = torch.randn(rows_per_expert, d, generator=g), torch.randn(rows_per_expert, f, generator=g)
    n_exp = len(fw.experts[0])
    offset = itertools.count()

    def run() -> None:
        o = next(offset)
        for lw, row, n in zip(fw.layers, fw.experts, hits, strict=True):
            F.linear(x, lw["q"]), F.linear(x, lw["k"]), F.linear(x, lw["v"]), F.linear(xo, lw["o"])
            F.linear(x, lw["gate"])
            for j in range(n):
                w13, w2 = row[(o + j) % n_exp]
                F.linear(xe, w13), F.linear(xf, w2)
        F.linear(x, fw.lm_head)

    return run


def measure_floor(fw: FloorWeights, batch: int, experts_per_layer: float, top_k: int, iters: int) -> dict[str, Any]:
    """Best-of-``iters`` seconds of :func:`floor_pass`; a fractional average of experts per layer is interpolated
    linearly between the two whole totals around it."""
    layers = len(fw.layers)
    total = experts_per_layer * layers
    lo = math.floor(total)
    rows = max(1, round(batch * top_k / max(experts_per_layer, 1e-9)))
    best = {}
    with torch.inference_mode():
        for n in sorted({lo, math.ceil(total)}):
            best[n] = min(common.time_calls(floor_pass(fw, batch, rows, split_hits(n, layers)), iters, warmup=2))
    frac = total - lo
    seconds = best[lo] if frac == 0 or len(best) == 1 else best[lo] * (1 - frac) + best[lo + 1] * frac
    return {
        "floor_s": seconds,
        "experts_per_layer": experts_per_layer,
        "rows_per_expert": rows,
        "weight_bytes": floor_bytes(fw, experts_per_layer),
        "weight_gb_per_s": floor_bytes(fw, experts_per_layer) / seconds / 1e9,
        "best_pass_s": {str(k): v for k, v in best.items()},
    }


def floor_bytes(fw: FloorWeights, experts_per_layer: float) -> float:
    """Bytes of weights a decode step reads (the floor's matrices)."""

    def nb(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    dense = sum(nb(w) for lw in fw.layers for w in lw.values()) + nb(fw.lm_head)
    w13, w2 = fw.experts[0][0]
    return dense + experts_per_layer * len(fw.layers) * (nb(w13) + nb(w2))


# ---------------------------------------------------------------------- (a) fixed batches
def decode_steps_ours(run: dict[str, Any]) -> list[float]:
    """Our steps after the first (the first prefills every prompt and samples the first token)."""
    return run["step_s"][1:]


def bench_fixed(
    s: EngineBenchSettings, frontend: Any, hf: Any, fw: FloorWeights, batch: int, progress: common.Progress
) -> dict[str, Any]:
    vocab = frontend.config.vocab_size
    prompts = random_prompts([s.prompt_len] * batch, vocab, s.seed + batch)
    progress(f"(a) batch {batch}: warm-up, counting experts hit per layer per decode step")
    hits = count_experts(frontend, prompts, s.new_tokens)
    hf_generate(hf, prompts, min(4, s.new_tokens))
    ours_runs, hf_runs = [], []
    for r in range(s.repeats):
        progress(f"(a) batch {batch}: repeat {r + 1}/{s.repeats} ours")
        ours_runs.append(drive(frontend.core, [(p, s.new_tokens) for p in prompts]))
        progress(f"(a) batch {batch}: repeat {r + 1}/{s.repeats} transformers")
        hf_runs.append(hf_generate(hf, prompts, s.new_tokens))
    experts_per_layer = statistics.fmean(hits) if hits else float(frontend.config.top_k)
    progress(f"(a) batch {batch}: floor ({experts_per_layer:.2f} experts per layer per step)")
    floor = measure_floor(fw, batch, experts_per_layer, frontend.config.top_k, s.floor_iters)
    tokens = batch * s.new_tokens
    ours = side_summary(ours_runs, tokens, decode_steps_ours, floor["floor_s"])
    theirs = side_summary(hf_runs, tokens, lambda run: run["step_s"], floor["floor_s"])
    same = [a == b for a, b in zip(ours_runs[0]["tokens"], hf_runs[0]["tokens"], strict=True)]
    return {
        "batch": batch,
        "new_tokens": s.new_tokens,
        "prompt_len": s.prompt_len,
        "ours": ours,
        "transformers": theirs,
        "floor": floor,
        "tokens_per_s_ratio": common.ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
        "same_greedy_tokens_rows": sum(same),
        "rows": len(same),
    }


def side_summary(
    runs: list[dict[str, Any]], tokens: int, steps_of: Callable[[dict[str, Any]], list[float]], floor_s: float
) -> dict[str, Any]:
    """Best-of-repeats tokens/s; decode-step median (and min) over every repeat's steps; step / floor."""
    best = min(r["total_s"] for r in runs)
    steps = [t for r in runs for t in steps_of(r)]
    st = common.summary(steps)
    return {
        "total_s_best": best,
        "total_s_all": [r["total_s"] for r in runs],
        "tokens_per_s": tokens / best,
        "step_ms_p50": st["p50"] * 1e3 if st["p50"] is not None else None,
        "step_ms_min": st["min"] * 1e3 if st["min"] is not None else None,
        "step_ms_mean": st["mean"] * 1e3 if st["mean"] is not None else None,
        "decode_steps": st["n"],
        "step_over_floor": common.ratio(st["p50"], floor_s),
    }


# ---------------------------------------------------------------------- (b) mixed workload
class StepRecorder:
    """Wraps ``ModelRunner.forward`` (as an instance attribute): tokens, chunks and seconds of every forward."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.inner = runner.forward
        self.steps: list[tuple[int, int, float]] = []

    def __call__(self, token_ids: torch.Tensor, chunks: list, logit_rows: torch.Tensor, **kw: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner(token_ids, chunks, logit_rows, **kw)
        self.steps.append((int(token_ids.shape[0]), len(chunks), time.perf_counter() - t0))
        return out


def drive_recorded(frontend: Any, work: list[tuple[list[int], int]]) -> tuple[dict, StepRecorder, ExpertCounter]:
    """:func:`drive` with the forward passes recorded and experts counted in full-batch decode steps."""
    runner = frontend.runner
    rec = StepRecorder(runner)
    counter = ExpertCounter(runner.experts, runner.kv.num_slots)
    runner.forward, runner.experts = rec, counter
    try:
        return drive(frontend.core, work), rec, counter
    finally:
        del runner.forward
        runner.experts = counter.inner


BUCKETS = ((1, 8), (9, 16), (17, 24), (25, 32), (33, 1 << 30))


def step_breakdown(steps: list[tuple[int, int, float]]) -> dict[str, Any]:
    """Forward time split into steps with a prefill chunk and decode-only steps; decode medians by batch size."""
    decode = [(n, t) for n, c, t in steps if n == c]
    prefill = [t for n, c, t in steps if n != c]
    by_batch = {}
    for lo, hi in BUCKETS:
        ts = [t for n, t in decode if lo <= n <= hi]
        if ts:
            by_batch[f"{lo}-{hi}" if hi < 1 << 30 else f">={lo}"] = {
                "steps": len(ts),
                "ms_p50": statistics.median(ts) * 1e3,
            }
    return {
        "prefill_steps": len(prefill),
        "prefill_s": sum(prefill),
        "decode_steps": len(decode),
        "decode_s": sum(t for _, t in decode),
        "decode_step_ms_by_batch": by_batch,
    }


def full_batch_floor(
    s: EngineBenchSettings, fw: FloorWeights, rec: StepRecorder, counter: ExpertCounter, top_k: int
) -> dict[str, Any] | None:
    """Decode steps at the full batch (max_num_seqs) against their floor, when the workload reached that batch."""
    full = [t for n, c, t in rec.steps if n == c == s.max_num_seqs]
    if not full or not counter.hits:
        return None
    floor = measure_floor(fw, s.max_num_seqs, statistics.fmean(counter.hits), top_k, s.floor_iters)
    step = statistics.median(full)
    return {
        "batch": s.max_num_seqs,
        "steps": len(full),
        "forward_ms_p50": step * 1e3,
        **floor,
        "step_over_floor": step / floor["floor_s"],
    }


def bench_mixed(
    s: EngineBenchSettings, frontend: Any, hf: Any, fw: FloorWeights, progress: common.Progress
) -> dict[str, Any]:
    vocab = frontend.config.vocab_size
    work = mixed_workload(s.mixed_requests, s.mixed_prompt_len, s.mixed_max_tokens, vocab, s.seed)
    useful = sum(n for _, n in work)
    progress(f"(b) mixed: ours, {len(work)} requests at once (continuous batching), {useful} output tokens")
    ours, rec, counter = drive_recorded(frontend, work)
    got = sum(len(t) for t in ours["tokens"])
    hf_total, hf_generated = 0.0, 0
    batches = [work[i : i + s.hf_batch] for i in range(0, len(work), s.hf_batch)]
    for b, batch in enumerate(batches):
        progress(f"(b) mixed: transformers static batch {b + 1}/{len(batches)}")
        longest = max(n for _, n in batch)
        run = hf_generate(hf, [p for p, _ in batch], longest)
        hf_total += run["total_s"]
        hf_generated += len(batch) * longest
    progress("(b) mixed: floor of our full-batch decode steps")
    ours_tps, hf_tps = got / ours["total_s"], useful / hf_total
    return {
        "requests": len(work),
        "prompt_tokens": sum(len(p) for p, _ in work),
        "useful_output_tokens": useful,
        "ours": {
            "total_s": ours["total_s"],
            "output_tokens": got,
            "tokens_per_s": ours_tps,
            "steps": len(ours["step_s"]),
            **step_breakdown(rec.steps),
            "full_batch_decode": full_batch_floor(s, fw, rec, counter, frontend.config.top_k),
        },
        "transformers": {
            "total_s": hf_total,
            "generated_tokens": hf_generated,
            "useful_tokens": useful,
            "tokens_per_s": hf_tps,
            "batch": s.hf_batch,
        },
        "tokens_per_s_ratio": ours_tps / hf_tps,
    }


# ---------------------------------------------------------------------- report
METHOD = {
    "fixed": (
        "Both run in this process on the same checkpoint, float32, CPU, greedy, with the same torch thread count. "
        "Ours: workers.frontend.Frontend (W = 0) driven step by step through its EngineCore, all prompts submitted "
        "at once, ignore_eos. Transformers: MixtralForCausalLM.generate with min_new_tokens = max_new_tokens. "
        "tokens/s = batch * new_tokens / wall time of the whole generation (best of the repeats, prefill included). "
        "Decode-step time: ours = EngineCore.step() wall time for every step after the first (the first prefills); "
        "transformers = gap between successive calls of a no-op logits processor (once per step). Median over all "
        "repeats' decode steps."
    ),
    "floor": (
        "One pass of the matrix products of a decode step and nothing else, timed best-of-N: a [B, D] activation "
        "against q, k, v and gate of every layer and lm_head, [B, q] against o, and per layer the average number "
        "of distinct experts that step hits (counted by wrapping our expert client during a warm-up run) with "
        "[r, D] x w13 and [r, F] x w2, r = B * top_k / experts hit (rows each hit expert actually gets). Expert "
        "choice rotates between passes; a fractional total is interpolated between the two whole totals."
    ),
    "mixed": (
        "Random token-id prompts and max_tokens from a fixed seed. Ours: all requests submitted at once to the "
        "continuous-batching core (max_num_seqs, max_num_batched_tokens as in settings), ignore_eos. Transformers: "
        "static batches in submission order, left padding with attention_mask and pad_token_id 0; each batch runs "
        "to its longest max_tokens (min_new_tokens = max_new_tokens) and only each row's own max_tokens count as "
        "useful tokens. Our forward passes are recorded (ModelRunner.forward wrapped): steps with a prefill chunk vs "
        "decode-only steps, decode-step medians by batch size, and the full-batch (max_num_seqs) decode steps "
        "against their own floor (experts hit counted in those steps)."
    ),
}


def goals_of(fixed: list[dict[str, Any]], mixed: dict[str, Any] | None) -> list[dict]:
    out = []
    for r in fixed:
        b = r["batch"]
        out.append(
            common.goal(
                f"engine tokens/s >= transformers at batch {b} (ours/theirs)",
                r["tokens_per_s_ratio"],
                1.0,
                at_least=True,
            )
        )
    for r in fixed:
        b = r["batch"]
        out.append(
            common.goal(
                f"engine decode step <= 1.25x floor at batch {b}", r["ours"]["step_over_floor"], 1.25, at_least=False
            )
        )
    if mixed is not None:
        out.append(
            common.goal(
                "mixed workload tokens/s >= 3x transformers static batches",
                mixed["tokens_per_s_ratio"],
                3.0,
                at_least=True,
            )
        )
    return out


def tables(fixed: list[dict[str, Any]], mixed: dict[str, Any] | None) -> list[str]:
    rows = []
    for r in fixed:
        for name in ("ours", "transformers"):
            side = r[name]
            rows.append(
                (
                    r["batch"],
                    name,
                    side["tokens_per_s"],
                    side["step_ms_p50"],
                    r["floor"]["floor_s"] * 1e3,
                    side["step_over_floor"],
                )
            )
    out = [
        common.table(
            ["batch", "engine", "tokens/s", "step ms p50", "floor ms", "step/floor"],
            rows,
            title="(a) fixed batches: decode steps against the matrix-product floor",
        )
    ]
    if mixed is not None:
        out.append(
            common.table(
                ["engine", "wall s", "useful tokens", "tokens/s"],
                [
                    (
                        "ours (continuous)",
                        mixed["ours"]["total_s"],
                        mixed["useful_output_tokens"],
                        mixed["ours"]["tokens_per_s"],
                    ),
                    (
                        f"transformers (static {mixed['transformers']['batch']})",
                        mixed["transformers"]["total_s"],
                        mixed["useful_output_tokens"],
                        mixed["transformers"]["tokens_per_s"],
                    ),
                    ("ratio ours/transformers", None, None, mixed["tokens_per_s_ratio"]),
                ],
                title=f"(b) mixed workload: {mixed['requests']} requests",
            )
        )
        out.append(mixed_breakdown_table(mixed["ours"]))
    return out


def mixed_breakdown_table(ours: dict[str, Any]) -> str:
    rows: list[tuple] = [("with a prefill chunk", ours["prefill_steps"], ours["prefill_s"], None, None)]
    for name, b in ours["decode_step_ms_by_batch"].items():
        rows.append((f"decode, batch {name}", b["steps"], None, b["ms_p50"], None))
    full = ours.get("full_batch_decode")
    if full:
        rows.append(
            (f"decode, batch {full['batch']} floor", None, None, full["floor_s"] * 1e3, full["step_over_floor"])
        )
    return common.table(
        ["our forward passes", "steps", "total s", "ms p50", "step/floor"], rows, title="(b) where our time went"
    )


def run_engine_bench(s: EngineBenchSettings, *, out: str | None = None, quiet: bool = False) -> dict:
    progress = common.Progress("engine", quiet=quiet)
    machine = common.machine_info()
    progress(f"loading {s.model} (ours, transformers, floor weights)")
    frontend = load_ours(s)
    hf = load_hf(s)
    fw = FloorWeights.load(s.model)
    fixed = [bench_fixed(s, frontend, hf, fw, b, progress) for b in s.batch_sizes]
    mixed = None if s.skip_mixed else bench_mixed(s, frontend, hf, fw, progress)
    settings = {**asdict(s), "transformers": hf_settings(hf), "ours_attention_backend": frontend.runner.backend}
    machine.update(common.end_probes(progress))
    payload = common.report(
        "engine",
        settings=settings,
        method=METHOD,
        results={"fixed": fixed, "mixed": mixed},
        goals=goals_of(fixed, mixed),
        machine=machine,
    )
    common.finish(payload, out, tables(fixed, mixed))
    return payload


# ---------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="in-process engine vs transformers generate, against the matmul floor")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench model, made once)")
    p.add_argument("--batch-sizes", type=common.int_list, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--floor-iters", type=int, default=20)
    p.add_argument("--mixed-requests", type=int, default=32)
    p.add_argument("--mixed-prompt-len", type=common.int_list, default=[8, 256], help="MIN,MAX")
    p.add_argument("--mixed-max-tokens", type=common.int_list, default=[16, 128], help="MIN,MAX")
    p.add_argument("--hf-batch", type=int, default=8, help="transformers' static batch size in the mixed workload")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--hf-experts-implementation", default=None, help="transformers' experts_implementation")
    p.add_argument("--skip-mixed", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    p.set_defaults(func=main)


def main(a: argparse.Namespace) -> int:
    if a.prompt_len < 2 or a.new_tokens < 2:
        raise SystemExit("mixserve bench engine: --prompt-len and --new-tokens must be >= 2")
    s = EngineBenchSettings(
        model=common.resolve_model(a.model),
        batch_sizes=a.batch_sizes,
        new_tokens=a.new_tokens,
        prompt_len=a.prompt_len,
        repeats=max(1, a.repeats),
        floor_iters=max(1, a.floor_iters),
        mixed_requests=a.mixed_requests,
        mixed_prompt_len=common.pair(a.mixed_prompt_len, "--mixed-prompt-len"),
        mixed_max_tokens=common.pair(a.mixed_max_tokens, "--mixed-max-tokens"),
        hf_batch=a.hf_batch,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        seed=a.seed,
        skip_mixed=a.skip_mixed,
        hf_experts_implementation=a.hf_experts_implementation,
    )
    run_engine_bench(s, out=a.out, quiet=a.quiet)
    return 0
