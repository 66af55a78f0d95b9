"""``mixserve bench engine``: the in-process engine (W = 0) against transformers' ``MixtralForCausalLM.generate`` on
the same checkpoint, dtype, device and torch threads (greedy, EOS ignored), beside the floor of a decode step.

(a) Fixed batches. Ours: ``build_frontend`` and its ``EngineCore.generate``, every prompt at once (the runner is
wrapped only to record each step). Transformers: ``generate`` with min_new_tokens = max_new_tokens. tokens/s =
batch x new_tokens / wall time (best of the repeats, prefill included, after one warm-up run). Decode step: median
over the full-batch decode-only steps; ours from one executor call's start to the next (schedule, forward, sample),
transformers between successive calls of a no-op logits processor.
Floor: recorded decode steps replayed on the model's own tensors, best-of-N: [B, in] activations against every 2-D
parameter of the model (fused qkv, o and gate per layer, lm_head; the embedding only when tied), then per layer
``ExpertShard.run`` with exactly the rows that step routed to each expert (the model's ExpertLoad counts); median
over up to 4 steps. weight_bytes: those matrices plus the experts hit.
Interleaved (the goal's ratio): the batch runs once more with every full-batch decode step followed at once by the
floor replay of that very step (its routed rows); decode step p50 over replay p50. Both are timed in the same
seconds, so the VM's drift (+-15% between runs minutes apart) moves both alike; the best-of-N floor above is the
lower bound, which a median step never reaches on a noisy machine.
(b) Mixed workload (fixed seed): all requests at once to our continuous batching against transformers in static
batches in submission order (left padded, each runs to its longest max_tokens; only each row's own max_tokens are
useful). Our forward passes by kind and batch size; full-batch decode forwards against their floor.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from cluster.bench import harness as h
from cluster.bench import kv
from cluster.bench.harness import Common, opt
from cluster.bench.steps import Recorder, Step, drive
from cluster.checkpoint.load import parse_dtype
from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.engine.sampling import SamplingParams
from cluster.engine.step import Executor
from cluster.runtime.frontend import Frontend, build_frontend
from router.transport import LocalTransport
from workers.projection import matrix_bytes


@dataclass
class Options(Common):
    """in-process engine vs transformers generate, against the floor of a decode step"""

    cluster_flags = ("dtype", "device", "attention_backend", "max_num_seqs", "max_num_batched_tokens", "max_model_len")
    cluster_defaults = {"max_num_seqs": 32, "max_model_len": 1024, "device": "cpu"}
    batch_sizes: str = opt("1,8,32", "fixed batch sizes, comma-separated")
    new_tokens: int = opt(64, "output tokens per sequence in the fixed batches")
    prompt_len: int = opt(16, "prompt tokens per sequence in the fixed batches")
    repeats: int = opt(2, "timed runs per side and batch (tokens/s: the best)")
    floor_iters: int = opt(20, "timed passes per replayed step of the floor (the best counts)")
    mixed_requests: int = opt(32, "requests of the mixed workload (0 skips it)")
    mixed_prompt_len: str = opt("8,256", "MIN,MAX prompt tokens of the mixed workload")
    mixed_max_tokens: str = opt("16,128", "MIN,MAX output tokens of the mixed workload")
    hf_batch: int = opt(8, "transformers' static batch size in the mixed workload")
    hf_experts_implementation: str | None = opt(None, "transformers' experts_implementation")
    prefix_requests: int = opt(32, "(c) requests sharing one system prompt (0 skips it)")
    prefix_len: int = opt(512, "(c) tokens of the shared system prompt")
    prefix_question_len: str = opt("16,64", "(c) MIN,MAX tokens of each request's own question")
    prefix_new_tokens: int = opt(8, "(c) output tokens per request")
    capacity_requests: int = opt(32, "(d) sequences submitted at once (0 skips it)")
    capacity_slots: int = opt(4, "(d) slots of max_model_len positions the slot cache had: the bytes both get")
    capacity_len: int = opt(256, "(d) tokens per sequence (half prompt, half output)")
    seed: int = opt(0, "seed of the prompts")
    quantization: str = opt("", "(e)/(f) instead: compare expert formats, e.g. none,int8,int4,fp8 (bench/quant.py)")
    kernel_shape: str = opt("14336,4096", "(f) the expert matrix of the kernel table, N,K")
    kernel_rows: str = opt("1,2,4,8,16,32,64", "(f) rows per expert of the kernel table")
    kernel_iters: int = opt(5, "(f) calls per cell of the kernel table (0 skips it)")


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    """One prompt per length, of random token ids in [3, vocab) (no UNK/BOS/EOS)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def load_hf(folder: str, dtype: str, device: str, experts_implementation: str | None) -> Any:
    from transformers import MixtralForCausalLM  # optional dependency (the test extra): only this benchmark needs it

    kw: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if experts_implementation:
        kw["experts_implementation"] = experts_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model: Any = MixtralForCausalLM.from_pretrained(folder, **kw)
    return model.to(device).eval()


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float], list[list[int]]]:
    """Greedy generate on a left-padded batch (pad id 0), exactly ``new_tokens`` each: wall seconds, the gaps between
    successive steps (a no-op logits processor stamps each) and the output ids per row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    stamps: list[float] = []
    clock = [lambda _, scores: stamps.append(time.perf_counter()) or scores]  # a logits processor that only records
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    t0 = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), logits_processor=clock, **kw)
    total = time.perf_counter() - t0
    return total, [b - a for a, b in itertools.pairwise(stamps)], out[:, width:].tolist()


class Floor:
    """Replays a decode step's weight reads on the model's own weights (see the module docstring)."""

    def __init__(self, fe: Frontend) -> None:
        model = fe.model
        self.mats = list(model.matrices().values())  # an untied embedding is only indexed: no matrix product
        transport = fe.experts.transport
        assert isinstance(transport, LocalTransport), "the engine benchmark runs every expert in-process (W = 0)"
        (self.shard,) = transport.shards.values()
        self.expert_bytes = self.shard.nbytes() / len(self.shard.experts)  # type: ignore[attr-defined]
        self.model = model

    def pass_of(self, batch: int, routed: torch.Tensor) -> Callable[[], None]:
        g, m = torch.Generator().manual_seed(0), self.model
        xs = {w.shape[1]: torch.randn(batch, w.shape[1], generator=g).to(m.device, m.dtype) for w in self.mats}
        jobs = []
        for layer, counts in enumerate(routed.tolist()):
            rows = torch.cat([torch.arange(c) for c in counts if c]).to(m.device)
            experts = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)], device=m.device)
            jobs.append((layer, xs[m.config.hidden_size], rows, experts, torch.ones(len(rows), device=m.device)))

        def run() -> None:
            for w in self.mats:
                x = xs[w.shape[1]]
                F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
            for job in jobs:
                self.shard.run(*job)

        return run

    def measure(self, batch: int, steps: list[Step], iters: int, samples: int = 4) -> dict[str, Any]:
        """Median over up to ``samples`` of ``steps`` (evenly spread) of the best-of-``iters`` seconds of a pass."""
        picked = steps[:: max(1, len(steps) // samples)][:samples]
        with torch.inference_mode():
            best = [min(h.time_calls(self.pass_of(batch, s.routed), iters)) for s in picked]
        layers = picked[0].routed.shape[0]
        hits = statistics.fmean(int((s.routed > 0).sum()) for s in picked) / layers
        nbytes = sum(matrix_bytes(w) for w in self.mats) + hits * layers * self.expert_bytes
        seconds = statistics.median(best)
        return {
            "floor_ms": seconds * 1e3,
            "replayed_steps": len(picked),
            "experts_per_layer": hits,
            "weight_bytes": nbytes,
            "weight_gb_per_s": nbytes / seconds / 1e9,
        }


def side(runs: list[tuple[float, list[float]]], tokens: int, floor_ms: float) -> dict[str, Any]:
    """(wall seconds, decode-step seconds) per repeat -> best tokens/s, decode-step median, step / floor."""
    ms = h.summary_ms([s for _, steps in runs for s in steps])
    return {
        "tokens_per_s": tokens / min(t for t, _ in runs),
        "total_s_all": [t for t, _ in runs],
        "step_ms_p50": ms["p50"],
        "step_ms_min": ms["min"],
        "decode_steps": ms["n"],
        "step_over_floor": h.ratio(ms["p50"], floor_ms),
    }


def interleaved(fe: Frontend, rec: Recorder, floor: Floor, work: list[tuple[list[int], int]], batch: int) -> dict:
    """The work once more, step by step: each full-batch decode step (schedule, forward, sample) and right after it
    the floor replay of its routed rows; their p50s and the ratio (see the module docstring)."""
    core = fe.core
    for i, (p, n) in enumerate(work):
        core.add_request(f"interleaved-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    steps: list[float] = []
    replays: list[float] = []
    finished = 0
    while finished < len(work):
        first = len(rec.steps)
        t0 = time.perf_counter()
        outs = core.step()
        seconds = time.perf_counter() - t0
        finished += sum(o.finished for o in outs)
        new = rec.steps[first:]
        if len(new) == 1 and new[0].decode and new[0].tokens == batch:
            replay = floor.pass_of(batch, new[0].routed)
            with torch.inference_mode():
                t1 = time.perf_counter()
                replay()
                h.sync()
                replays.append(time.perf_counter() - t1)
            steps.append(seconds)
    step_ms, floor_ms = h.summary_ms(steps)["p50"], h.summary_ms(replays)["p50"]
    return {"steps": len(steps), "step_ms_p50": step_ms, "floor_ms_p50": floor_ms, "ratio": h.ratio(step_ms, floor_ms)}


def bench_fixed(o: Options, fe: Frontend, rec: Recorder, hf: Any, floor: Floor, batch: int, run: h.Run) -> dict:
    prompts = random_prompts([o.prompt_len] * batch, fe.model_config.vocab_size, o.seed + batch)
    work = [(p, o.new_tokens) for p in prompts]
    run(f"(a) batch {batch}: warm-up")
    drive(fe, rec, work)
    hf_generate(hf, prompts, min(4, o.new_tokens))
    ours, theirs = [], []
    for r in range(o.repeats):
        run(f"(a) batch {batch}: repeat {r + 1}/{o.repeats}, ours then transformers")
        ours.append(drive(fe, rec, work))
        theirs.append(hf_generate(hf, prompts, o.new_tokens))
    decode = [[s for s in steps if s.decode and s.tokens == batch] for _, steps, _ in ours]
    run(f"(a) batch {batch}: floor")
    fl = floor.measure(batch, decode[0], o.floor_iters)
    run(f"(a) batch {batch}: decode steps interleaved with their floor replays")
    fl["interleaved"] = interleaved(fe, rec, floor, work, batch)
    tokens = batch * o.new_tokens
    a = side([(t, [s.step_s for s in d]) for (t, _, _), d in zip(ours, decode, strict=True)], tokens, fl["floor_ms"])
    b = side([(t, steps) for t, steps, _ in theirs], tokens, fl["floor_ms"])
    same = sum(x == y for x, y in zip(ours[0][2], theirs[0][2], strict=True))
    return {
        "batch": batch,
        "ours": a,
        "transformers": b,
        "floor": fl,
        "same_greedy_tokens_rows": same,
        "tokens_per_s_ratio": h.ratio(a["tokens_per_s"], b["tokens_per_s"]),
    }


BUCKETS = ((1, 8), (9, 16), (17, 24), (25, 32), (33, 1 << 30))


def forward_passes(steps: list[Step]) -> list[dict[str, Any]]:
    """Where our forward time went: steps with a prefill chunk, then decode-only steps by batch size."""
    prefill = [s.forward_s for s in steps if not s.decode]
    out = [{"steps": "with a prefill chunk", "n": len(prefill), "total_s": sum(prefill)}]
    for lo, hi in BUCKETS:
        ts = [s.forward_s for s in steps if s.decode and lo <= s.tokens <= hi]
        if ts:
            name = f"decode, batch {lo}-{hi}" if hi < BUCKETS[-1][1] else f"decode, batch >= {lo}"
            out.append({"steps": name, "n": len(ts), "total_s": sum(ts), "ms_p50": statistics.median(ts) * 1e3})
    return out


def bench_mixed(o: Options, fe: Frontend, rec: Recorder, hf: Any, floor: Floor, run: h.Run) -> dict[str, Any]:
    rng = random.Random(o.seed)
    lengths = [rng.randint(*h.ints(o.mixed_prompt_len, "mixed-prompt-len", span=True)) for _ in range(o.mixed_requests)]
    budgets = [rng.randint(*h.ints(o.mixed_max_tokens, "mixed-max-tokens", span=True)) for _ in range(o.mixed_requests)]
    work = list(zip(random_prompts(lengths, fe.model_config.vocab_size, o.seed + 1), budgets, strict=True))
    run(f"(b) mixed: ours, {len(work)} requests at once (continuous batching), {sum(budgets)} output tokens")
    total, steps, outs = drive(fe, rec, work)
    hf_total = 0.0
    for i in range(0, len(work), o.hf_batch):
        run(f"(b) mixed: transformers static batch {i // o.hf_batch + 1}/{-(-len(work) // o.hf_batch)}")
        batch = work[i : i + o.hf_batch]
        hf_total += hf_generate(hf, [p for p, _ in batch], max(n for _, n in batch))[0]
    passes = forward_passes(steps)
    full = [s for s in steps if s.decode and s.tokens == fe.config.engine.max_num_seqs]
    if full:
        run(f"(b) mixed: floor of the decode steps at the full batch ({len(full)} steps)")
        fl = floor.measure(full[0].tokens, full, o.floor_iters)
        fwd = statistics.median(s.forward_s for s in full) * 1e3
        name = f"decode, batch {full[0].tokens}: floor"
        passes.append({"steps": name, **fl, "ms_p50": fl["floor_ms"], "forward_over_floor": fwd / fl["floor_ms"]})
    got, useful = sum(len(t) for t in outs), sum(budgets)
    ours = {"engine": "ours (continuous)", "total_s": total, "output_tokens": got, "tokens_per_s": got / total}
    theirs = {"engine": f"transformers (static {o.hf_batch})", "total_s": hf_total, "tokens_per_s": useful / hf_total}
    return {
        "requests": len(work),
        "prompt_tokens": sum(lengths),
        "useful_output_tokens": useful,
        "ours": ours,
        "transformers": theirs,
        "forward_passes": passes,
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
    }


def goals_of(fixed: list[dict[str, Any]], mixed: dict[str, Any] | None) -> list[dict]:
    out = []
    for r in fixed:
        text = f"engine tokens/s >= transformers at batch {r['batch']} (ours/theirs)"
        out.append(h.goal(text, r["tokens_per_s_ratio"], 1.0, at_least=True))
    for r in fixed:
        text = f"engine decode step <= 1.15x floor at batch {r['batch']} (interleaved p50s)"
        best = f"p50 step over the best-of-N floor: {h.fmt(r['ours']['step_over_floor'])}"
        out.append(h.goal(text, r["floor"]["interleaved"]["ratio"], 1.15, at_least=False, note=best))
    if mixed is not None:
        text = "mixed workload tokens/s >= 4x transformers static batches"
        out.append(h.goal(text, mixed["tokens_per_s_ratio"], 4.0, at_least=True))
    return out


def tables(fixed: list[dict[str, Any]], mixed: dict[str, Any] | None) -> list[str]:
    rows = [{"batch": r["batch"], "engine": n, **r[n], **r["floor"]} for r in fixed for n in ("ours", "transformers")]
    cols = ["batch", "engine", "tokens_per_s", "step_ms_p50", "floor_ms", "step_over_floor"]
    out = [h.table(rows, cols, title="(a) fixed batches: decode steps against the best-of-N floor")]
    rows = [{"batch": r["batch"], **r["floor"]["interleaved"]} for r in fixed]
    cols = ["batch", "steps", "step_ms_p50", "floor_ms_p50", "ratio"]
    out.append(h.table(rows, cols, title="(a) ours: each decode step followed by its floor replay"))
    if mixed is not None:
        title = f"(b) mixed: {mixed['requests']} requests"
        out.append(h.table([mixed["ours"], mixed["transformers"]], ["engine", "total_s", "tokens_per_s"], title=title))
        cols = ["steps", "n", "total_s", "ms_p50", "forward_over_floor"]
        out.append(h.table(mixed["forward_passes"], cols, title="(b) our forward passes"))
    return out


def run(o: Options, cluster: dict[str, Any]) -> dict:
    if o.prompt_len < 2 or o.new_tokens < 2:
        raise SystemExit("mixserve bench engine: --prompt-len and --new-tokens must be >= 2")
    r = h.Run("engine", o)
    if o.quantization:
        from cluster.bench.quant import run_formats  # its own comparison: (e) and (f) of bench/quant.py

        return run_formats(o, cluster, r)
    config = resolve(ClusterConfig.create(model=h.model_dir(o.model), **cluster))
    r(f"loading {config.load.model} (ours, then transformers)")
    fe = build_frontend(config, progress=False)
    fe.core.executor = cast(Executor, rec := Recorder(fe))  # the runner's executor contract, by delegation
    hf = load_hf(str(config.load.model), config.load.dtype, fe.device, o.hf_experts_implementation)
    floor = Floor(fe)
    fixed = [bench_fixed(o, fe, rec, hf, floor, b, r) for b in h.ints(o.batch_sizes, "batch-sizes")]
    mixed = bench_mixed(o, fe, rec, hf, floor, r) if o.mixed_requests else None
    prefix = kv.bench_prefix(o, config, r) if o.prefix_requests else None
    capacity = kv.bench_capacity(o, config, r) if o.capacity_requests else None
    hf_impl = {k: getattr(hf.config, f"_{k}", None) for k in ("attn_implementation", "experts_implementation")}
    settings = {"cluster": config.options(), "ours": fe.info(), "transformers": hf_impl}
    goals = goals_of(fixed, mixed) + kv.goals_of(prefix, capacity)
    results = {"fixed": fixed, "mixed": mixed, "prefix_sharing": prefix, "capacity": capacity}
    out = tables(fixed, mixed) + kv.tables(prefix, capacity)
    return r.finish(settings=settings, method=f"{__doc__}\n{kv.__doc__}", results=results, goals=goals, tables=out)
