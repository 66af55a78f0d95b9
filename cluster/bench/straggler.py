"""``mixserve bench straggler``: what one frozen expert worker costs a generation, with a copy of every expert on
another worker (hedged dispatch: ``router.latency``, ``router.client``) and without.

The offline ``LLM`` with W expert workers (--expert-workers, default 2; object_ref transport, float32, the bench
model) on a private local Ray. One generation = one ``generate`` call of --prompts token-id prompts (--prompt-len
tokens each, seeded) x --max-tokens greedy tokens (temperature 0, ignore_eos). Two LLMs, one after the other:

(b) copies: expert_replicas=2. (c) no copies: expert_replicas=1.

Each LLM: one warm-up generation (it also gives the hedging bound its samples); steady = seconds of one generation;
frozen = the same generation with worker --worker SIGSTOPped once decoding has begun (the frontend's
generation_tokens counter, polled every POLL_S, past 2 tokens per prompt more than before the call) and SIGCONTed
after --freeze-s seconds or as soon as the generation ends, whichever is first (and in any case before the LLM shuts
down). extra_s = frozen - steady of the same LLM. While the generation runs (in a thread) the main thread calls
``llm.health(timeout_s=1.0)`` every HEALTH_EVERY_S seconds (between answers) until one reports the worker not ok:
detected_s = from the SIGSTOP to that answer. hedges = the increase of ``frontend_info()["hedges"]`` (layers sent to
another copy because the worker answered late) over the frozen run; same_tokens: the frozen run's token ids equal
the steady run's. Times in seconds (wall clock, ``time.perf_counter``).

Goals: with copies, extra_s <= 3 and same tokens; without copies, detected_s <= 2 (health reports the stall).
``--served`` measures the same through the Serve application over HTTP (``cluster.bench.straggler_served``).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from cluster import LLM, SamplingParams
from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.config.model import ModelConfig

POLL_S = 0.05  # seconds between reads of the generation_tokens counter
HEALTH_EVERY_S = 0.2  # seconds between health calls while frozen
HEALTH_TIMEOUT_S = 1.0  # each health call's wait for the workers' answers


@dataclass
class Options(Common):
    """a frozen expert worker (SIGSTOP) during a generation: hedged around with copies, reported by health without"""

    cluster_flags = ("expert_workers", "transport", "dtype", "max_num_seqs")
    cluster_defaults = {"expert_workers": 2, "transport": "object_ref", "dtype": "float32"}
    prompts: int = opt(8, "prompts per generation")
    prompt_len: int = opt(16, "tokens per prompt")
    max_tokens: int = opt(160, "greedy tokens per prompt (ignore_eos)")
    freeze_s: float = opt(10.0, "seconds the worker stays SIGSTOPped (less when the generation ends first)")
    worker: int = opt(1, "the expert worker to freeze")
    seed: int = opt(0, "seed of the prompts")
    served: bool = opt(False, "through the served application over HTTP instead (cluster.bench.straggler_served)")


class Freezer:
    """SIGSTOP of one process, and its SIGCONT at most once, from whichever thread comes first."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stopped_at: float | None = None  # perf_counter seconds
        self.continued_at: float | None = None
        self._lock = threading.Lock()

    def stop(self) -> None:
        with self._lock:
            self.stopped_at = time.perf_counter()
            os.kill(self.pid, signal.SIGSTOP)

    def cont(self) -> None:
        with self._lock:
            if self.stopped_at is not None and self.continued_at is None:
                os.kill(self.pid, signal.SIGCONT)
                self.continued_at = time.perf_counter()


def tokens_of(outs: list) -> list[list[int]]:
    return [list(x.token_ids) for x in outs]


def timed_generate(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    tokens = tokens_of(llm.generate(prompts, params, use_tqdm=False))
    return time.perf_counter() - t0, tokens


def decoding(llm: LLM, target: int, thread: threading.Thread) -> bool:
    """Wait until the frontend has generated ``target`` tokens in all; False when the generation ended first."""
    while thread.is_alive():
        if llm.frontend_info()["engine"]["generation_tokens"] >= target:
            return True
        time.sleep(POLL_S)
    return False


def watch_health(llm: LLM, worker: int, freezer: Freezer, thread: threading.Thread) -> float | None:
    """Seconds from the SIGSTOP to the first health answer that reports ``worker`` not ok; None when none did while
    the generation ran and the worker was stopped."""
    assert freezer.stopped_at is not None
    while thread.is_alive() and freezer.continued_at is None:
        entries = llm.health(timeout_s=HEALTH_TIMEOUT_S)["workers"]
        answered = time.perf_counter()
        if any(w["worker"] == worker and not w["ok"] for w in entries):
            return answered - freezer.stopped_at
        time.sleep(HEALTH_EVERY_S)
    return None


def frozen_run(llm: LLM, prompts: list[list[int]], params: SamplingParams, o: Options) -> dict[str, Any]:
    """The generation with worker ``o.worker`` frozen for up to ``o.freeze_s`` seconds once it decodes (module
    docstring); the worker is always continued before this returns or raises."""
    pid = next(w["pid"] for w in llm.placement() if w["worker"] == o.worker)
    info = llm.frontend_info()
    freezer, out = Freezer(pid), {}

    def generate() -> None:
        try:
            out["s"], out["tokens"] = timed_generate(llm, prompts, params)
        except Exception as e:  # reported in the row; the worker is continued all the same
            out["error"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            freezer.cont()

    thread = threading.Thread(target=generate, name="straggler-generate", daemon=True)
    timer = threading.Timer(o.freeze_s, freezer.cont)
    detected = None
    try:
        thread.start()
        if decoding(llm, info["engine"]["generation_tokens"] + 2 * len(prompts), thread):
            freezer.stop()
            timer.start()
            detected = watch_health(llm, o.worker, freezer, thread)
        thread.join()
    finally:
        timer.cancel()
        freezer.cont()
    frozen = None
    if freezer.stopped_at is not None and freezer.continued_at is not None:
        frozen = freezer.continued_at - freezer.stopped_at
    error = out.get("error") or (None if frozen is not None else "the generation ended before it was frozen")
    hedges = llm.frontend_info()["hedges"] - info["hedges"]
    return {"total_s": out.get("s"), "frozen_s": frozen, "hedges": hedges, "detected_s": detected, "error": error,
            "tokens": out.get("tokens")}  # fmt: skip


def measure(o: Options, cluster: dict[str, Any], replicas: int, r: h.Run) -> list[dict[str, Any]]:
    """One LLM with ``replicas`` copies of every expert: warm-up, steady and frozen rows (tokens left out)."""
    folder = h.model_dir(o.model)
    rng = random.Random(o.seed)
    vocab = ModelConfig.from_dir(folder).vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(o.prompt_len)] for _ in range(o.prompts)]
    params = SamplingParams(max_tokens=o.max_tokens, temperature=0, ignore_eos=True)
    tag = f"R={replicas}"
    r(f"{tag}: starting the LLM (W={cluster['expert_workers']}, {replicas} copies of every expert)")
    with LLM(folder, expert_replicas=replicas, progress=False, **cluster) as llm:
        r(f"{tag}: warm-up generation ({o.prompts} prompts x {o.max_tokens} tokens)")
        timed_generate(llm, prompts, params)
        steady_s, steady = timed_generate(llm, prompts, params)
        r(f"{tag}: steady {steady_s:.2f}s; now the same with worker {o.worker} frozen for {o.freeze_s:g}s")
        f = frozen_run(llm, prompts, params, o)
    tokens = f.pop("tokens")
    extra = None if f["total_s"] is None else f["total_s"] - steady_s
    frozen = {"copies": replicas, "run": "frozen", **f, "extra_s": extra, "same_tokens": tokens == steady}
    seen = f"{h.fmt(f['total_s'])}s (extra {h.fmt(extra)}s), {f['hedges']} hedges, health {h.fmt(f['detected_s'])}s"
    r(f"{tag}: frozen {seen}")
    return [{"copies": replicas, "run": "steady", "total_s": steady_s}, frozen]


def goals_of(b: dict[str, Any], c: dict[str, Any], o: Options) -> list[dict]:
    same = None if b["error"] else float(b["same_tokens"])
    return [
        h.goal(f"copies (R=2): extra seconds of a {o.freeze_s:g}s freeze <= 3", b["extra_s"], 3.0, at_least=False,
               note=b["error"]),
        h.goal("copies (R=2): frozen run's tokens == steady run's (1 = equal)", same, 1.0, at_least=True,
               note=b["error"]),
        h.goal("no copies (R=1): seconds from SIGSTOP to health reporting the worker not ok <= 2", c["detected_s"],
               2.0, at_least=False, note=c["error"] or (None if c["detected_s"] is not None else "never reported")),
    ]  # fmt: skip


def run(o: Options, cluster: dict[str, Any]) -> dict:
    w = cluster["expert_workers"]
    if w < 2 or not 0 <= o.worker < w:
        raise SystemExit(f"mixserve bench straggler: needs --expert-workers >= 2 and 0 <= --worker < {w}")
    r = h.Run("straggler", o)
    with h.local_ray(w + 3):
        rows = measure(o, cluster, 2, r) + measure(o, cluster, 1, r)
    cols = ["copies", "run", "total_s", "extra_s", "frozen_s", "hedges", "same_tokens", "detected_s", "error"]
    title = f"worker {o.worker} of {w} frozen for up to {o.freeze_s:g}s ({o.prompts} prompts x {o.max_tokens} tokens)"
    tables = [h.table(rows, cols, title=title)]
    settings = {"cluster": cluster, "model_dir": h.model_dir(o.model)}
    goals = goals_of(rows[1], rows[3], o)
    return r.finish(settings=settings, method=__doc__, results={"runs": rows}, goals=goals, tables=tables)
