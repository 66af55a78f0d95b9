"""``mixserve bench serve``: a load generator against an OpenAI-compatible HTTP endpoint (streaming completions).

``--url`` targets a running server; by default one is started in-process (Ray + Ray Serve, ``build_app``) on a free
port on 127.0.0.1 and shut down afterwards. Per concurrency level (closed loop, fixed prompts, greedy,
``ignore_eos``): time to first token, inter-token latency, output tokens/s and error rate; then the
continuous-batching gain (tokens/s at the highest level over the lowest) and the sharded server against the
in-process one (W = 0) at the highest level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.bench import common


@dataclass(frozen=True)
class ServeBenchSettings:
    url: str | None = None
    baseline_url: str | None = None
    model: str | None = None
    expert_workers: int = 2
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests_per_level: int | None = None  # None: max(8, 2 x concurrency)
    max_tokens: int = 64
    prompt_len: tuple[int, int] = (16, 64)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    served_model_name: str | None = None
    api_key: str | None = None
    request_timeout_s: float = 300.0
    skip_baseline: bool = False
    seed: int = 0


# ---------------------------------------------------------------------- one request
@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between successive streamed chunks with text
    tokens: int = 0
    error: str | None = None


def prompts_for(count: int, prompt_len: tuple[int, int], seed: int, vocab: int = 32000) -> list[list[int]]:
    """Fixed random token-id prompts (ids in [3, vocab)), lengths uniform in ``prompt_len``."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(count)]


def completion_body(prompt: list[int], s: ServeBenchSettings, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": s.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if model:
        body["model"] = model
    return body


def parse_event(line: str) -> dict | str | None:
    """An SSE ``data:`` line -> its JSON object, "[DONE]", or None for anything else."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return "[DONE]" if data == "[DONE]" else json.loads(data)


async def one_request(client: Any, url: str, body: dict, headers: dict) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(ok=False, start=t0, end=t0)
    last: float | None = None
    chunks_tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                ev = parse_event(line)
                if ev is None:
                    continue
                if ev == "[DONE]":
                    break
                if "error" in ev:
                    res.error = str(ev["error"].get("message", ev["error"]))[:200]
                    return res
                if ev.get("usage"):
                    res.tokens = int(ev["usage"]["completion_tokens"])
                now = time.perf_counter()
                for ch in ev.get("choices", []):
                    if not ch.get("text"):
                        continue
                    chunks_tokens += 1
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.gaps_s.append(now - last)
                    last = now
        res.ok = res.ttft_s is not None
        res.tokens = res.tokens or chunks_tokens
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as e:  # a failed request counts as an error, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        res.end = time.perf_counter()
    return res


# ---------------------------------------------------------------------- one concurrency level
async def run_level(
    url: str, s: ServeBenchSettings, model: str | None, concurrency: int, requests: int
) -> list[RequestResult]:
    """Closed loop: ``concurrency`` clients each send their next request as soon as the previous one finished."""
    import httpx

    prompts = prompts_for(requests, s.prompt_len, s.seed)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=s.request_timeout_s, limits=limits) as client:

        async def client_loop() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                results.append(await one_request(client, url, completion_body(p, s, model), headers))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


def level_summary(concurrency: int, results: list[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    wall = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    tokens = sum(r.tokens for r in ok)
    ttft = common.summary([r.ttft_s for r in ok if r.ttft_s is not None])
    itl = common.summary([g for r in ok for g in r.gaps_s])
    tpot = [(r.end - r.start - r.ttft_s) / (r.tokens - 1) for r in ok if r.ttft_s is not None and r.tokens > 1]
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_rate": len(errors) / len(results) if results else None,
        "first_errors": errors[:3],
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "ttft_ms_p50": _ms(ttft["p50"]),
        "ttft_ms_p99": _ms(ttft["p99"]),
        "itl_ms_p50": _ms(itl["p50"]),
        "itl_ms_p99": _ms(itl["p99"]),
        "tpot_ms_mean": _ms(sum(tpot) / len(tpot)) if tpot else None,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


def requests_at(s: ServeBenchSettings, concurrency: int) -> int:
    return s.requests_per_level or max(8, 2 * concurrency)


def sweep(url: str, s: ServeBenchSettings, levels: list[int], progress: common.Progress, tag: str) -> list[dict]:
    model = s.served_model_name or discover_model(url, s.api_key)
    progress(f"{tag}: warm-up request ({model})")
    warm = asyncio.run(run_level(url, s, model, 1, 1))
    if not warm[0].ok:
        progress(f"{tag}: warm-up failed: {warm[0].error}")
    out = []
    for c in levels:
        n = requests_at(s, c)
        progress(f"{tag}: concurrency {c}, {n} requests x {s.max_tokens} tokens")
        out.append(level_summary(c, asyncio.run(run_level(url, s, model, c, n))))
        progress(f"{tag}: concurrency {c}: {fmt_tps(out[-1])} tokens/s, {out[-1]['errors']} errors")
    return out


def fmt_tps(level: dict) -> str:
    return common.fmt(level["tokens_per_s"])


def discover_model(url: str, api_key: str | None) -> str | None:
    """The first model id listed at /v1/models (None when the server does not say)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with contextlib.suppress(Exception):
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        return r.json()["data"][0]["id"]
    return None


# ---------------------------------------------------------------------- a local server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


APP_NAME = "mixserve-bench"


class LocalServer:
    """Ray (if not running) + Ray Serve on a free loopback port; ``deploy(W)`` (re)deploys the application."""

    def __init__(self, s: ServeBenchSettings, progress: common.Progress) -> None:
        from ray import serve

        self.s = s
        self.progress = progress
        self.started_ray = common.init_ray(6 + s.expert_workers)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"

    def deploy(self, expert_workers: int) -> str:
        from ray import serve

        from cluster.serve.app import build_app

        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        args = {
            "model": self.s.model,
            "expert_workers": expert_workers,
            "gpus_per_worker": 0,
            "max_num_seqs": self.s.max_num_seqs,
            "max_num_batched_tokens": self.s.max_num_batched_tokens,
            "request_timeout_s": self.s.request_timeout_s,
        }
        self.progress(f"deploying the application with {expert_workers} expert workers on {self.url}")
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        wait_healthy(self.url, timeout_s=300)
        return self.url

    def close(self) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        with contextlib.suppress(Exception):
            serve.shutdown()
        if self.started_ray:
            ray.shutdown()


def wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f}s")


# ---------------------------------------------------------------------- the run
METHOD = (
    "Streaming POST /v1/completions with token-id prompts (fixed seed, lengths uniform in prompt_len), "
    "temperature 0, ignore_eos, max_tokens fixed, stream_options.include_usage for the exact token count. Closed "
    "loop: at concurrency c, c clients each send their next request when the previous one ends, until the level's "
    "requests are done (max(8, 2c) by default). TTFT: request start to the first streamed chunk with text. ITL: "
    "gaps between successive chunks with text (one token each unless the detokenizer held text back), pooled over "
    "requests. tpot_ms_mean: (end - first token) / (tokens - 1). tokens/s: completion tokens of successful "
    "requests / level wall time. Errors: non-200 status, an error event, or no tokens. One warm-up request first. "
    "The in-process server is deployed with build_app on 127.0.0.1 (CPU, gpus_per_worker 0); the W = 0 baseline "
    "is the same application redeployed with expert_workers 0, measured at the highest level only."
)


def goals_of(levels: list[dict], baseline: dict | None, s: ServeBenchSettings) -> list[dict]:
    by_c = {lv["concurrency"]: lv for lv in levels}
    lo, hi = min(by_c), max(by_c)
    gain = common.ratio(by_c[hi]["tokens_per_s"], by_c[lo]["tokens_per_s"]) if lo != hi else None
    out = [
        common.goal(
            f"continuous-batching gain: tokens/s at {hi} / at {lo} >= 8",
            gain,
            8.0,
            at_least=True,
            note=None if gain is not None else "needs two concurrency levels",
        )
    ]
    shard = common.ratio(by_c[hi]["tokens_per_s"], baseline["tokens_per_s"]) if baseline else None
    out.append(
        common.goal(
            f"{'target' if s.url else f'sharded (W={s.expert_workers})'} tokens/s at {hi} >= 0.6x in-process (W=0)",
            shard,
            0.6,
            at_least=True,
            note=None
            if baseline
            else "no W=0 baseline measured (pass --baseline-url with --url, or drop --skip-baseline)",
        )
    )
    err = max((lv["error_rate"] or 0.0) for lv in levels)
    out.append(common.goal("error rate == 0 at every level", err, 0.0, at_least=False))
    return out


def table_of(levels: list[dict], baseline: dict | None, s: ServeBenchSettings) -> str:
    name = "target" if s.url else f"W={s.expert_workers}"
    rows = [(name, *_cells(lv)) for lv in levels]
    if baseline:
        rows.append(("baseline" if s.url else "W=0", *_cells(baseline)))
    return common.table(
        ["server", "conc", "reqs", "err", "tokens/s", "ttft p50", "ttft p99", "itl p50", "itl p99", "tpot"],
        rows,
        title="streaming completions (latencies in ms)",
    )


def _cells(lv: dict) -> tuple:
    return (
        lv["concurrency"],
        lv["requests"],
        lv["errors"],
        lv["tokens_per_s"],
        lv["ttft_ms_p50"],
        lv["ttft_ms_p99"],
        lv["itl_ms_p50"],
        lv["itl_ms_p99"],
        lv["tpot_ms_mean"],
    )


def measure(s: ServeBenchSettings, progress: common.Progress) -> tuple[list[dict], dict | None, dict]:
    """The levels on the target, then the W = 0 baseline at the highest level (when there is one to measure)."""
    top = max(s.concurrency)
    if s.url:
        levels = sweep(s.url.rstrip("/"), s, s.concurrency, progress, "target")
        baseline = None
        if s.baseline_url and not s.skip_baseline:
            baseline = sweep(s.baseline_url.rstrip("/"), s, [top], progress, "baseline")[0]
        return levels, baseline, {"server": "external"}
    server = LocalServer(s, progress)
    try:
        url = server.deploy(s.expert_workers)
        levels = sweep(url, s, s.concurrency, progress, f"W={s.expert_workers}")
        baseline = None
        if not s.skip_baseline and s.expert_workers != 0:
            url = server.deploy(0)
            baseline = sweep(url, s, [top], progress, "W=0")[0]
    finally:
        server.close()
    return levels, baseline, {"server": "in-process", "port": server.port}


def run_serve_bench(s: ServeBenchSettings, *, out: str | None = None, quiet: bool = False) -> dict:
    progress = common.Progress("serve", quiet=quiet)
    machine = common.machine_info()
    if s.model is None and not s.url:
        from cluster.tiny_model import default_model_dir

        s = ServeBenchSettings(**{**asdict(s), "model": str(default_model_dir())})
    levels, baseline, where = measure(s, progress)
    machine.update(common.end_probes(progress))
    payload = common.report(
        "serve",
        settings={**asdict(s), "api_key": "***" if s.api_key else None, **where},
        method=METHOD,
        results={"levels": levels, "baseline_w0": baseline},
        goals=goals_of(levels, baseline, s),
        machine=machine,
    )
    common.finish(payload, out, [table_of(levels, baseline, s)])
    return payload


# ---------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load generator against the OpenAI HTTP API (starts a local server by default)")
    p.add_argument("--url", default=None, help="base URL of a running server (default: start one in-process)")
    p.add_argument("--baseline-url", default=None, help="with --url: a W=0 server to compare at the top level")
    p.add_argument("--model", default=None, help="checkpoint for the local server (default: the built-in tiny model)")
    p.add_argument("--expert-workers", type=int, default=2)
    p.add_argument("--concurrency", type=common.int_list, default=[1, 8, 32])
    p.add_argument("--requests-per-level", type=int, default=None, help="default max(8, 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=common.int_list, default=[16, 64], help="MIN,MAX")
    p.add_argument("--max-num-seqs", type=int, default=32, help="local server's max_num_seqs")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--served-model-name", default=None, help="default: the first id at /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--skip-baseline", action="store_true", help="do not measure the W=0 server")
    p.add_argument("--seed", type=int, default=0)
    common.add_common_args(p)
    p.set_defaults(func=main)


def main(a: argparse.Namespace) -> int:
    if not a.concurrency or min(a.concurrency) < 1:
        raise SystemExit("mixserve bench serve: --concurrency takes positive integers")
    s = ServeBenchSettings(
        url=a.url,
        baseline_url=a.baseline_url,
        model=a.model,
        expert_workers=a.expert_workers,
        concurrency=sorted(set(a.concurrency)),
        requests_per_level=a.requests_per_level,
        max_tokens=a.max_tokens,
        prompt_len=common.pair(a.prompt_len, "--prompt-len"),
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        served_model_name=a.served_model_name,
        api_key=a.api_key,
        request_timeout_s=a.request_timeout_s,
        skip_baseline=a.skip_baseline,
        seed=a.seed,
    )
    run_serve_bench(s, out=a.out, quiet=a.quiet)
    return 0
