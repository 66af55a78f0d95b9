"""``mixserve bench serve``: a load generator against an OpenAI-compatible HTTP endpoint (streaming completions).

``--url`` targets a running server; by default the application (``build_app``, Ray Serve) is deployed in-process
on a free port on 127.0.0.1 and shut down afterwards. Streaming POST /v1/completions with token-id prompts (fixed
seed, lengths uniform in prompt_len), temperature 0, ignore_eos, fixed max_tokens, stream_options.include_usage
for the exact token count. Closed loop: at concurrency c, c clients each send their next request when the previous
one ends, until the level's requests are done (max(8, 2c) by default); one warm-up request first. TTFT: request
start to the first streamed chunk with text. ITL: gaps between successive chunks with text, pooled over requests.
tpot_ms_mean: (end - first token) / (tokens - 1). tokens/s: completion tokens of successful requests / level wall
time. Errors: non-200 status, an error event, or no tokens. Then the continuous-batching gain (tokens/s at the
highest level over the lowest) and, at the highest level only, the sharded server against the same application
redeployed with expert_workers 0 (or --baseline-url).

--workload pooling: pooled requests instead (``cluster.bench.serve_pooling``, whose docstring states that method).

--frontend-replicas M1,M2,...: instead, M frontends over one expert pool against M applications with a pool each, at
one total concurrency (``cluster.bench.serve_pools``, whose docstring states that method; the CLI enters ``bench serve``
there, and it hands every run without the flag to :func:`run` here).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.serve.app import build_app

APP_NAME = "mixserve-bench"


@dataclass
class Options(Common):
    """load generator against the OpenAI HTTP API (deploys a local server by default)"""

    cluster_flags = (
        "expert_workers",
        "transport",
        "max_num_seqs",
        "max_num_batched_tokens",
        "gpus_per_worker",
        "dtype",
    )
    cluster_defaults = {"expert_workers": 2, "max_num_seqs": 32}
    url: str | None = opt(None, "base URL of a running server (default: deploy one in-process)")
    baseline_url: str | None = opt(None, "with --url: a W=0 server to compare at the highest level")
    concurrency: str = opt("1,8,32", "concurrency levels, comma-separated")
    requests_per_level: int | None = opt(None, "requests per level (default: max(8, 2 x concurrency))")
    max_tokens: int = opt(64, "max_tokens of every request")
    prompt_len: str = opt("16,64", "MIN,MAX prompt tokens")
    served_model_name: str | None = opt(None, "model name to send (default: the first id at /v1/models)")
    api_key: str | None = opt(None, "bearer token")
    request_timeout_s: float = opt(300.0, "client timeout per request; also the local server's")
    skip_baseline: bool = opt(False, "do not measure the W=0 server")
    seed: int = opt(0, "seed of the prompts")
    frontend_replicas: str | None = opt(
        None, "M1,M2,...: M frontends over ONE expert pool vs M apps of a pool each (own apps: no --url, no W=0 run)"
    )
    pool_concurrency: int | None = opt(None, "with --frontend-replicas: total clients (default: highest --concurrency)")
    pool_transports: str = opt(
        "object_ref,channel", "with --frontend-replicas: transports of the M-pools cases (one pool uses --transport)"
    )
    workload: str = opt(
        "generate",
        "generate: streaming completions; pooling: /v1/embeddings (/classify on a classifier checkpoint) against "
        "transformers' batched forward (cluster.bench.serve_pooling)",
    )


@dataclass
class Result:
    ok: bool = False
    start: float = field(default_factory=time.perf_counter)
    end: float = 0.0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between successive streamed chunks with text
    tokens: int = 0
    error: str | None = None


async def one_request(client: Any, url: str, body: dict, headers: dict) -> Result:
    """One streamed completion: time to the first chunk with text, gaps between such chunks, tokens, or an error."""
    res, stamps = Result(), []
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else "[DONE]"
                    ev = json.loads(data) if data != "[DONE]" else {}
                    if "error" in ev:
                        res.error = str(ev["error"].get("message", ev["error"]))[:200]
                    res.tokens = int((ev.get("usage") or {}).get("completion_tokens", res.tokens))
                    stamps += [time.perf_counter()] * sum(1 for ch in ev.get("choices", []) if ch.get("text"))
    except Exception as e:  # a failed request counts as an error, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:200]
    res.end, res.tokens = time.perf_counter(), res.tokens or len(stamps)
    res.ttft_s = stamps[0] - res.start if stamps else None
    res.gaps_s = [b - a for a, b in itertools.pairwise(stamps)]
    res.ok = res.error is None and bool(stamps)
    res.error = res.error or (None if res.ok else "no tokens streamed")
    return res


async def level(o: Options, url: str, model: str | None, concurrency: int, requests: int) -> list[Result]:
    """Closed loop: ``concurrency`` clients each send their next request as soon as the previous one finished."""
    import httpx  # optional dependency (the test extra): only this benchmark needs it

    rng = random.Random(o.seed)
    lo, hi = h.ints(o.prompt_len, "prompt-len", span=True)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))] for _ in range(requests)]
    headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
    base = {"max_tokens": o.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    base.update(stream_options={"include_usage": True}, **({"model": model} if model else {}))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=o.request_timeout_s, limits=limits) as client:

        async def loop() -> None:
            while prompts:
                results.append(await one_request(client, url, {**base, "prompt": prompts.pop()}, headers))

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return results


def summarize(concurrency: int, results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    wall = max(r.end for r in results) - min(r.start for r in results)
    tokens = sum(r.tokens for r in ok)
    ms = {"ttft_ms": h.summary_ms([r.ttft_s for r in ok if r.ttft_s is not None])}
    ms["itl_ms"] = h.summary_ms([g for r in ok for g in r.gaps_s])
    tpot = [(r.end - r.start - r.ttft_s) / (r.tokens - 1) for r in ok if r.ttft_s is not None and r.tokens > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_rate": len(errors) / len(results),
        "first_errors": errors[:3],
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        **{f"{name}_{q}": s[q] for name, s in ms.items() for q in ("p50", "p99")},
        "tpot_ms_mean": 1e3 * sum(tpot) / len(tpot) if tpot else None,
    }


def sweep(o: Options, url: str, levels: list[int], run: h.Run, tag: str) -> list[dict]:
    import httpx  # optional dependency (the test extra): only this benchmark needs it

    url = url.rstrip("/")
    model = o.served_model_name
    if model is None:
        headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        with contextlib.suppress(Exception):
            model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    run(f"{tag}: warm-up request ({model})")
    asyncio.run(level(o, url, model, 1, 1))
    out = []
    for c in levels:
        n = o.requests_per_level or max(8, 2 * c)
        run(f"{tag}: concurrency {c}, {n} requests x {o.max_tokens} tokens")
        out.append({"server": tag, **summarize(c, asyncio.run(level(o, url, model, c, n)))})
        run(f"{tag}: concurrency {c}: {h.fmt(out[-1]['tokens_per_s'])} tokens/s, {out[-1]['errors']} errors")
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the local Serve HTTP proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(o: Options, cluster: dict[str, Any], url: str, expert_workers: int, run: h.Run) -> str:
    """(Re)deploy the application on the local Serve instance; returns once /health answers 200."""
    import httpx  # optional dependency (the test extra): only this benchmark needs it

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    args = {**cluster, "model": o.model, "expert_workers": expert_workers, "request_timeout_s": o.request_timeout_s}
    run(f"deploying the application with {expert_workers} expert workers on {url}")
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return url
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within 300s")


def goals_of(levels: list[dict], baseline: dict | None, target: str) -> list[dict]:
    by_c = {lv["concurrency"]: lv for lv in levels}
    lo, hi = min(by_c), max(by_c)
    gain = h.ratio(by_c[hi]["tokens_per_s"], by_c[lo]["tokens_per_s"]) if lo != hi else None
    note = None if gain is not None else "needs two concurrency levels"
    shard = h.ratio(by_c[hi]["tokens_per_s"], baseline["tokens_per_s"]) if baseline else None
    why = None if baseline else "no W=0 baseline measured (pass --baseline-url with --url, or drop --skip-baseline)"
    return [
        h.goal(f"continuous-batching gain: tokens/s at {hi} / at {lo} >= 8", gain, 8.0, at_least=True, note=note),
        h.goal(f"{target} tokens/s at {hi} >= 0.6x in-process (W=0)", shard, 0.6, at_least=True, note=why),
        h.goal("error rate == 0 at every level", max(lv["error_rate"] for lv in levels), 0.0, at_least=False),
    ]


def run(o: Options, cluster: dict[str, Any]) -> dict:
    if o.frontend_replicas is not None:  # the CLI sends these to cluster.bench.serve_pools (it imports this module)
        raise SystemExit("mixserve bench serve: --frontend-replicas runs in cluster.bench.serve_pools.run")
    levels = sorted(set(h.ints(o.concurrency, "concurrency")))
    r = h.Run("serve", o)
    top, w = levels[-1:], cluster["expert_workers"]
    if o.url:
        where, target = {"server": "external"}, "target"
        results = sweep(o, o.url, levels, r, "target")
        baseline = None
        if o.baseline_url and not o.skip_baseline:
            baseline = sweep(o, o.baseline_url, top, r, "baseline")[0]
    else:
        port = free_port()
        where, target, url = {"server": "in-process", "port": port}, f"sharded (W={w})", f"http://127.0.0.1:{port}"
        with h.local_ray(6 + w):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                results = sweep(o, deploy(o, cluster, url, w, r), levels, r, f"W={w}")
                baseline = None
                if not o.skip_baseline and w != 0:
                    baseline = sweep(o, deploy(o, cluster, url, 0, r), top, r, "W=0")[0]
            finally:
                with contextlib.suppress(Exception):
                    serve.shutdown()
    settings = {**where, "api_key": "***" if o.api_key else None, "cluster": cluster}
    cols = ["server", "concurrency", "requests", "errors", "tokens_per_s", "ttft_ms_p50", "ttft_ms_p99"]
    cols += ["itl_ms_p50", "itl_ms_p99", "tpot_ms_mean"]
    tables = [h.table(results + ([baseline] if baseline else []), cols, title="streaming completions")]
    goals = goals_of(results, baseline, target)
    res = {"levels": results, "baseline_w0": baseline}
    return r.finish(settings=settings, method=__doc__, results=res, goals=goals, tables=tables)
