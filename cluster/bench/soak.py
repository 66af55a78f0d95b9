"""``mixserve bench soak``: steady streaming load for ``--minutes`` against the application deployed in-process
(as ``mixserve bench serve`` deploys it), with the resident memory of every Ray actor process sampled over time.

``concurrency`` clients send streaming completions back to back (the serve benchmark's client); every
``sample_s`` seconds the RSS (/proc/<pid>/status VmRSS) of each alive actor (frontend, expert workers, ingress,
Serve's proxy and controller) is recorded. Growth of a process = RSS at the end (median of the last 5 samples)
over RSS when the warm-up ends (median of the 5 samples after ``warmup_minutes``), in percent. MB = MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from ray import serve

from cluster.bench import harness as h
from cluster.bench import serve as serve_bench
from cluster.bench.harness import Common, opt

MB = 1024 * 1024


@dataclass
class Options(Common):
    """steady streaming load for N minutes, RSS of every actor over time"""

    cluster_flags = ("expert_workers", "max_num_seqs")
    cluster_defaults = {"expert_workers": 2, "max_num_seqs": 16}
    minutes: float = opt(20.0, "how long the load runs")
    warmup_minutes: float = opt(2.0, "load before the RSS baseline is taken")
    concurrency: int = opt(8, "streaming clients")
    max_tokens: int = opt(64, "max_tokens of every request")
    prompt_len: str = opt("16,128", "MIN,MAX prompt tokens")
    sample_s: float = opt(10.0, "seconds between RSS samples")
    request_timeout_s: float = opt(300.0, "client timeout per request; also the server's")
    seed: int = opt(0, "seed of the prompts")


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (this benchmark started Ray, so its raylet and actors are among them)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def actor_rss() -> dict[str, int]:
    """This benchmark's Ray actor processes (titled ``ray::<Class>...``; idle pooled workers left out):
    "<Class>:<pid>" -> RSS bytes."""
    out = {}
    for pid in descendants(os.getpid()):
        proc = Path(f"/proc/{pid}")
        with contextlib.suppress(OSError):
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::") or title.startswith("ray::IDLE"):
                continue
            rss = h.kib_bytes(h.proc_fields(str(proc / "status")), "VmRSS")
            if rss is not None:
                out[f"{title[5:].split('.')[0].split(' ')[0]}:{pid}"] = rss
    return out


async def load(o: Options, url: str, stop_at: float, results: list[serve_bench.Result]) -> None:
    rng = random.Random(o.seed)
    lo, hi = h.ints(o.prompt_len, "prompt-len", span=True)
    body = {"max_tokens": o.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}
    limits = httpx.Limits(max_connections=o.concurrency + 4, max_keepalive_connections=o.concurrency + 4)
    async with httpx.AsyncClient(timeout=o.request_timeout_s, limits=limits) as client:

        async def loop() -> None:
            while time.monotonic() < stop_at:
                prompt = [rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))]
                results.append(await serve_bench.one_request(client, url, {**body, "prompt": prompt}, {}))

        await asyncio.gather(*(loop() for _ in range(o.concurrency)))


async def soak(o: Options, url: str, run: h.Run) -> tuple[list[serve_bench.Result], list[tuple[float, dict]]]:
    t0 = time.monotonic()
    results: list[serve_bench.Result] = []
    samples: list[tuple[float, dict[str, int]]] = []
    task = asyncio.create_task(load(o, url, t0 + o.minutes * 60, results))
    while not task.done():
        samples.append((time.monotonic() - t0, await asyncio.to_thread(actor_rss)))
        ok = sum(r.ok for r in results)
        run(f"{samples[-1][0] / 60:5.1f} min: {ok} requests done, {len(results) - ok} errors")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), o.sample_s)
    await task
    return results, samples


def growth(samples: list[tuple[float, dict[str, int]]], warmup_s: float) -> list[dict[str, Any]]:
    after = [s for t, s in samples if t >= warmup_s]
    rows = []
    for proc in sorted(set().union(*(s.keys() for s in after)) if after else ()):
        series = [s[proc] for s in after if proc in s]
        if len(series) < 2:
            continue
        start, end = statistics.median(series[:5]), statistics.median(series[-5:])
        rows.append(
            {
                "process": proc,
                "samples": len(series),
                "rss_start_mb": start / MB,
                "rss_end_mb": end / MB,
                "rss_max_mb": max(series) / MB,
                "growth_pct": 100 * (end - start) / start,
            }
        )
    return rows


def run(o: Options, cluster: dict[str, Any]) -> dict:
    r = h.Run("soak", o)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, w = f"http://127.0.0.1:{port}", cluster["expert_workers"]
    deploy_opts = serve_bench.Options(model=o.model, request_timeout_s=o.request_timeout_s)
    with h.local_ray(6 + w):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve_bench.deploy(deploy_opts, cluster, url, w, r)
            results, samples = asyncio.run(soak(o, url, r))
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
    procs = growth(samples, o.warmup_minutes * 60)
    errors = [x.error for x in results if not x.ok]
    summary = {
        "minutes": o.minutes,
        "requests": len(results),
        "errors": len(errors),
        "first_errors": errors[:3],
        "output_tokens": sum(x.tokens for x in results if x.ok),
    }
    worst = max((p["growth_pct"] for p in procs), default=None)
    goals = [
        h.goal("RSS growth after warm-up, worst process (%)", worst, 3.0, at_least=False),
        h.goal("errors during the soak", float(len(errors)), 0.0, at_least=False),
    ]
    cols = ["process", "samples", "rss_start_mb", "rss_end_mb", "rss_max_mb", "growth_pct"]
    tables = [h.table([summary], list(summary)[:-2] + ["output_tokens"], title="load")]
    tables.append(h.table(procs, cols, title="RSS per process after warm-up"))
    timeline = [{"t_s": t, **{k: v / MB for k, v in s.items()}} for t, s in samples]
    res = {"load": summary, "processes": procs, "timeline_mb": timeline}
    return r.finish(settings={"cluster": cluster}, method=__doc__, results=res, goals=goals, tables=tables)
