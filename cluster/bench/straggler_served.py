"""``mixserve bench straggler --served``: the same measurement as ``cluster.bench.straggler``, through the served
application over HTTP.

The application (``build_app``: W expert workers over object refs, the bench model, float32, --max-num-seqs) is
deployed with Ray Serve in this process on a free port of 127.0.0.1, once with expert_replicas=2 (copies) and once
with expert_replicas=1. One generation = the --prompts prompts sent at once as non-streaming ``POST
/v1/completions`` (one client thread each; greedy, ignore_eos, --max-tokens); its seconds run from the first send to
the last answer. steady = one such generation after a warm-up one; frozen = the same with worker --worker
SIGSTOPped once decoding has begun (the ``mixserve:generation_tokens`` counter of ``/metrics``, polled, past 2 tokens
per prompt more than before) and SIGCONTed after --freeze-s or as soon as the generation ends. The worker's pid comes
from ``/health``. While frozen, ``GET /health`` is read every HEALTH_EVERY_S seconds until it reports the worker not
ok: detected_s is from the SIGSTOP to that answer (the ingress refreshes its health every second, with a one-second
timeout per worker). same_tokens: every frozen answer's text equals its steady one.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

from cluster.bench import harness as h
from cluster.bench import straggler
from cluster.bench.straggler import HEALTH_EVERY_S, POLL_S, Freezer, Options, goals_of
from cluster.config.model import ModelConfig

__all__ = ["Options", "run"]

APP = "mixserve-straggler"


def _metric(base: str, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _generate(base: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[str | None]]:
    """Every prompt as one completion, all at once: (seconds, texts; None for a failed request)."""
    import httpx

    texts: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        with contextlib.suppress(Exception):
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
            if r.status_code == 200:
                texts[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, texts


def _worker(base: str, worker: int) -> dict[str, Any]:
    import httpx

    return next(w for w in httpx.get(f"{base}/health", timeout=30).json()["workers"] if w["worker"] == worker)


def _frozen(base: str, prompts: list[list[int]], o: Options) -> dict[str, Any]:
    """The generation with the worker frozen once it decodes; the worker is always continued before this returns."""
    freezer, out = Freezer(int(_worker(base, o.worker)["pid"])), {}
    tokens = _metric(base, "mixserve:generation_tokens_total")

    def generate() -> None:
        try:
            out["s"], out["texts"] = _generate(base, prompts, o.max_tokens)
        finally:
            freezer.cont()

    thread = threading.Thread(target=generate, daemon=True)
    timer = threading.Timer(o.freeze_s, freezer.cont)
    detected = None
    try:
        thread.start()
        while thread.is_alive() and _metric(base, "mixserve:generation_tokens_total") < tokens + 2 * len(prompts):
            time.sleep(POLL_S)
        if thread.is_alive():
            freezer.stop()
            timer.start()
            while thread.is_alive() and freezer.continued_at is None and detected is None:
                if not _worker(base, o.worker)["ok"]:
                    detected = time.perf_counter() - (freezer.stopped_at or 0.0)
                time.sleep(HEALTH_EVERY_S)
        thread.join()
    finally:
        timer.cancel()
        freezer.cont()
    frozen = None if freezer.stopped_at is None or freezer.continued_at is None else (
        freezer.continued_at - freezer.stopped_at)  # fmt: skip
    error = None if frozen is not None else "the generation ended before it was frozen"
    return {"total_s": out.get("s"), "frozen_s": frozen, "detected_s": detected, "error": error,
            "texts": out.get("texts")}  # fmt: skip


def measure(o: Options, cluster: dict[str, Any], base: str, replicas: int, r: h.Run) -> list[dict[str, Any]]:
    import httpx
    from ray import serve

    from cluster.serve.app import build_app

    folder = h.model_dir(o.model)
    rng = random.Random(o.seed)
    vocab = ModelConfig.from_dir(folder).vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(o.prompt_len)] for _ in range(o.prompts)]
    args = {**cluster, "model": folder, "expert_replicas": replicas, "gpus_per_worker": 0, "request_timeout_s": 300}
    r(f"R={replicas}: deploying the application (W={cluster['expert_workers']}, {replicas} copies of every expert)")
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    try:
        deadline = time.monotonic() + 300
        while httpx.get(f"{base}/health", timeout=30).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the application never became healthy")
            time.sleep(0.5)
        _generate(base, prompts, o.max_tokens)  # warm-up (and the hedging bound's samples)
        steady_s, steady = _generate(base, prompts, o.max_tokens)
        r(f"R={replicas}: steady {steady_s:.2f}s; now the same with worker {o.worker} frozen for {o.freeze_s:g}s")
        f = _frozen(base, prompts, o)
    finally:
        serve.delete(APP)
    texts = f.pop("texts")
    extra = None if f["total_s"] is None else f["total_s"] - steady_s
    same = texts == steady and None not in steady
    r(f"R={replicas}: frozen {h.fmt(f['total_s'])}s (extra {h.fmt(extra)}s), health {h.fmt(f['detected_s'])}s")
    return [
        {"copies": replicas, "run": "steady", "total_s": steady_s},
        {"copies": replicas, "run": "frozen", **f, "extra_s": extra, "same_tokens": same},
    ]


def run(o: Options, cluster: dict[str, Any]) -> dict:
    """``mixserve bench straggler``: offline (``cluster.bench.straggler.run``) unless ``--served``."""
    if not o.served:
        return straggler.run(o, cluster)
    from ray import serve

    from cluster.bench.serve import free_port

    w = cluster["expert_workers"]
    if w < 2 or not 0 <= o.worker < w:
        raise SystemExit(f"mixserve bench straggler: needs --expert-workers >= 2 and 0 <= --worker < {w}")
    r, port = h.Run("straggler", o), free_port()
    base = f"http://127.0.0.1:{port}"
    with h.local_ray(w + 6):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            rows = measure(o, cluster, base, 2, r) + measure(o, cluster, base, 1, r)
        finally:
            serve.shutdown()
    cols = ["copies", "run", "total_s", "extra_s", "frozen_s", "same_tokens", "detected_s", "error"]
    title = f"served: worker {o.worker} of {w} frozen for up to {o.freeze_s:g}s ({o.prompts} x {o.max_tokens} tokens)"
    settings = {"cluster": cluster, "model_dir": h.model_dir(o.model), "served": True}
    return r.finish(settings=settings, method=__doc__, results={"runs": rows}, goals=goals_of(rows[1], rows[3], o),
                    tables=[h.table(rows, cols, title=title)])  # fmt: skip
