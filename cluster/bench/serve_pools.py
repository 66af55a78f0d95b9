"""``mixserve bench serve --frontend-replicas 1,2,4``: M frontend replicas over ONE expert pool against M separate
applications with a pool each, at the same total concurrency.

Total concurrency C: --pool-concurrency, else the highest --concurrency level; N requests in all per case
(--requests-per-level, else max(8, 2C)). Requests, prompts and timings are ``cluster.bench.serve``'s (streaming
completions, closed loop, temperature 0, ignore_eos, --max-tokens). On one local Serve instance (one HTTP port), for
each M of --frontend-replicas, each case deployed alone (the previous one deleted first):

(a) one pool: one application (``build_app``) with frontend_replicas=M and one ExpertPool of W expert workers
    (--expert-workers); C clients against its route prefix (Serve spreads them over the M frontends).
(b) M pools, once per transport of --pool-transports (at M = 1, only the transports other than case a's): M
    applications, each with frontend_replicas=1 and its own pool of W workers over that transport, under their own
    names and route prefixes; C/M clients and N/M requests each (remainders to the first applications), all at once;
    application i's prompts are seeded with --seed + i.

Why the channel transport is only in case b: a Ray Compiled Graph has one driver and an actor serves one compiled
graph at a time, so a channel pool serves exactly one frontend (the transport registry's ``shared_pool`` is False
for it). The alternatives for M frontends are therefore M channel pools (a full copy of the experts per frontend,
no merging across frontends, cheaper hops) or one pool over ordinary actor calls (object refs: 1/M of the expert
bytes, merged matmuls, dearer hops); this benchmark measures both at the same load. ``vs one pool`` is a case's
tokens/s over the one-pool case's at the same M.

Each application first gets one warm-up request per frontend. Per case, over all its applications: tokens/s =
completion tokens of successful requests / (last request end - first request start); TTFT p50 and ITL p50 / p99,
pooled over requests (ms); errors. expert bytes = sum of ``expert_bytes`` over ``workers`` of GET <prefix>/health.
rows per expert matmul = (sum over workers of merge.rows) / (sum of merge.expert_calls), both as the increase over
the measured load (GET <prefix>/health read before and after it, each SETTLE_S after the last request, so the ingress's
health check, refreshed every REFRESH_S, has seen every run); a row is one (token, expert) assignment a worker
computed. per-frontend requests: the increase of ``mixserve:frontend_requests_total{engine}`` at GET <prefix>/metrics
over the load (``engine``: the frontend replica; with M pools, prefixed by the application's index).

Goals, at each M > 1, against the M pools over the one pool's own transport (object_ref): one pool's tokens/s >= 1.0x
the M pools'; its expert bytes <= 1/M of theirs. At M = 2: rows per expert matmul of the one pool >= 1.5x the 2
pools'. Same per-frontend load: each of the 2 pools is a one-frontend application at the per-frontend concurrency
C/2, which is the M = 1 reference at C/M; the one pool's 2 frontends see C/2 each (on average: the per-frontend
requests show the split), so the gain is what the workers' merging of the two frontends' layers adds. The M channel
pools are measured beside them; no goal compares with them (the error-free goal covers every case).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import time
from typing import Any

from ray import serve

from cluster.bench import harness as h
from cluster.bench import serve as serve_bench
from cluster.bench import serve_pooling
from cluster.bench.serve import APP_NAME, Options, Result, free_port, level, summarize
from cluster.config.serving import parse_args
from cluster.config.transports import SERVE_NAMES, spec_of
from cluster.serve.app import build_app
from cluster.serve.ingress.health import REFRESH_S

SETTLE_S = 2 * REFRESH_S + 0.5  # seconds: the ingress's health check has run at least once since the last request
INGRESS_CPUS, POOL_OWNER_CPUS = 0.5, 0.1  # what build_app asks Ray for besides the frontends and workers
FRONTEND_REQUESTS = re.compile(r"^mixserve:frontend_requests_total\{([^}]*)\}\s+(\S+)", re.MULTILINE)
ENGINE = re.compile(r'engine="([^"]*)"')


def ray_cpus(cluster: dict[str, Any], ms: list[int]) -> int:
    """Logical CPUs for the largest case, max(M) applications of one frontend each: per application its frontend
    (frontend_cpus), ingress, pool owner and W workers (cpus_per_worker each); plus 1 for Serve's own actors."""
    p = parse_args(dict(cluster)).parallel
    per_app = p.frontend_cpus + INGRESS_CPUS + POOL_OWNER_CPUS + p.expert_workers * p.cpus_per_worker
    return math.ceil(max(ms) * per_app) + 1


def shares(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers go, the remainder to the first parts: 5, 2 -> [3, 2]."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def get(url: str) -> Any:
    import httpx  # optional dependency (the test extra): only this benchmark needs it

    return httpx.get(url, timeout=30)


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if get(url + "/health").status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f}s")


def pool_state(url: str, app: int) -> dict[str, Any]:
    """From one application: expert bytes and merge totals over its workers (/health), requests per frontend
    (/metrics, keyed ``"<app>:<engine>"``)."""
    workers = get(url + "/health").json().get("workers") or []
    merges = [w.get("merge") or {} for w in workers]
    requests = {}
    for labels, value in FRONTEND_REQUESTS.findall(get(url + "/metrics").text):
        engine = ENGINE.search(labels)
        requests[f"{app}:{engine.group(1) if engine else '?'}"] = float(value)
    return {
        "expert_bytes": sum(w.get("expert_bytes") or 0 for w in workers),
        "rows": sum(m.get("rows", 0) for m in merges),
        "expert_calls": sum(m.get("expert_calls", 0) for m in merges),
        "requests": requests,
    }


def served_model(o: Options, url: str) -> str | None:
    """--served-model-name, else the first id at /v1/models (None when it does not answer)."""
    if o.served_model_name is not None:
        return o.served_model_name
    with contextlib.suppress(Exception):
        return get(url + "/v1/models").json()["data"][0]["id"]
    return None


async def together(o: Options, urls: list[str], model: str | None, clients: list[int], requests: list[int]) -> list:
    """Application i gets ``clients[i]`` closed-loop clients and ``requests[i]`` requests, all at once."""
    jobs = [
        level(dataclasses.replace(o, seed=o.seed + i), url, model, c, n)
        for i, (url, c, n) in enumerate(zip(urls, clients, requests, strict=True))
    ]
    return [x for results in await asyncio.gather(*jobs) for x in results]


def deploy(o: Options, cluster: dict[str, Any], base: str, apps: list[str], frontends: int, r: h.Run) -> list[str]:
    """Deploy applications named ``apps`` (route prefix /<name>), each with ``frontends`` frontend replicas and its
    own pool; returns their URLs once each /health answers 200."""
    args = {**cluster, "model": o.model, "request_timeout_s": o.request_timeout_s, "frontend_replicas": frontends}
    urls = []
    for name in apps:
        r(f"deploying {name}: {frontends} frontend(s), {cluster['expert_workers']} expert workers")
        serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
        urls.append(f"{base}/{name}")
    for url in urls:
        wait_healthy(url)
    return urls


@dataclasses.dataclass(frozen=True)
class Case:
    """M frontends in ``pools`` applications (1: one app of M frontends; M: M apps of one) over ``transport``."""

    m: int
    pools: int
    transport: str

    @property
    def label(self) -> str:
        return f"M={self.m}, {self.pools} pool(s) over {self.transport}"


def cases(ms: list[int], shared: str, transports: list[str]) -> list[Case]:
    """For each M: one pool over ``shared``, then M pools over each of ``transports`` (at M = 1 a pool over
    ``shared`` is the one-pool case already)::

        >>> [(c.m, c.pools, c.transport) for c in cases([1, 2], "object_ref", ["object_ref", "channel"])]
        [(1, 1, 'object_ref'), (1, 1, 'channel'), (2, 1, 'object_ref'), (2, 2, 'object_ref'), (2, 2, 'channel')]
    """
    out = []
    for m in ms:
        out.append(Case(m, 1, shared))
        out += [Case(m, m, t) for t in transports if m > 1 or t != shared]
    return out


def measure(o: Options, cluster: dict[str, Any], base: str, case: Case, load: tuple[int, int], r: h.Run) -> dict:
    """One case, ``load`` = (total clients C, total requests N) split over its applications; deleted afterwards."""
    m, pools = case.m, case.pools
    apps = [f"{APP_NAME}-m{m}-{pools}pool-{case.transport}-{i}" for i in range(pools)]
    clients, requests = shares(load[0], pools), shares(load[1], pools)
    try:
        urls = deploy(o, {**cluster, "transport": case.transport}, base, apps, m // pools, r)
        model = served_model(o, urls[0])
        per_app = m // pools
        r(f"{case.label}: warm-up, {per_app} request(s) per application")
        asyncio.run(together(o, urls, model, [per_app] * pools, [per_app] * pools))
        time.sleep(SETTLE_S)
        before = [pool_state(u, i) for i, u in enumerate(urls)]
        r(f"{case.label}: {load[0]} clients ({'+'.join(map(str, clients))}), {load[1]} requests")
        results: list[Result] = asyncio.run(together(o, urls, model, clients, requests))
        time.sleep(SETTLE_S)
        after = [pool_state(u, i) for i, u in enumerate(urls)]
    finally:
        for name in apps:
            with contextlib.suppress(Exception):
                serve.delete(name)
    row = case_row(case, clients, results, before, after)
    r(f"{case.label}: {h.fmt(row['tokens_per_s'])} tokens/s, {row['errors']} errors")
    return row


def case_row(case: Case, clients: list[int], results: list[Result], before: list, after: list) -> dict:
    rows = sum(a["rows"] - b["rows"] for a, b in zip(after, before, strict=True))
    calls = sum(a["expert_calls"] - b["expert_calls"] for a, b in zip(after, before, strict=True))
    seen = {k: v for b in before for k, v in b["requests"].items()}
    per_frontend = {k: v - seen.get(k, 0.0) for a in after for k, v in a["requests"].items()}
    return {
        "m": case.m,
        "case": "one pool" if case.pools == 1 else f"{case.pools} pools",
        "transport": case.transport,
        "apps": case.pools,
        "clients": "+".join(map(str, clients)),
        **summarize(sum(clients), results),
        "expert_bytes": sum(a["expert_bytes"] for a in after),
        "expert_mb": sum(a["expert_bytes"] for a in after) / 2**20,
        "expert_rows": rows,
        "expert_matmuls": calls,
        "rows_per_matmul": rows / calls if calls else None,
        "frontend_requests": per_frontend,
        "per_frontend": "/".join(str(round(v)) for _, v in sorted(per_frontend.items())),
    }


def compare_with_one_pool(rows: list[dict], shared: str) -> None:
    """Adds ``vs_one_pool`` to each row: its tokens/s over the one-pool case's (over ``shared``) at the same M."""
    one = {x["m"]: x for x in rows if x["apps"] == 1 and x["transport"] == shared}
    for x in rows:
        x["vs_one_pool"] = h.ratio(x["tokens_per_s"], one[x["m"]]["tokens_per_s"])


def goals_of(rows: list[dict], ms: list[int], shared: str) -> list[dict]:
    """The issue's goals, one pool against the M pools over the same transport (``shared``)."""
    by = {(x["m"], x["apps"]): x for x in rows if x["transport"] == shared}
    goals = []
    for m in (m for m in ms if m > 1):
        one, own = by[(m, 1)], by[(m, m)]
        tps = h.ratio(one["tokens_per_s"], own["tokens_per_s"])
        goals.append(h.goal(f"M={m}: one pool's tokens/s >= 1.0x {m} pools'", tps, 1.0, at_least=True))
        held = h.ratio(one["expert_bytes"], own["expert_bytes"])
        goals.append(h.goal(f"M={m}: one pool's expert bytes <= 1/{m} of {m} pools'", held, 1 / m, at_least=False))
    text = "M=2: rows per expert matmul, one pool >= 1.5x 2 pools' (1 frontend each at C/2)"
    if 2 in ms:
        gain = h.ratio(by[(2, 1)]["rows_per_matmul"], by[(2, 2)]["rows_per_matmul"])
        goals.append(h.goal(text, gain, 1.5, at_least=True, note=None if gain else "no expert matmuls counted"))
    else:
        goals.append(h.goal(text, None, 1.5, at_least=True, note="needs 2 in --frontend-replicas"))
    goals.append(h.goal("error rate == 0 in every case", max(x["error_rate"] for x in rows), 0.0, at_least=False))
    return goals


def pool_transports(cluster: dict[str, Any], flag: str) -> tuple[str, list[str]]:
    """(the one pool's transport: --transport, which must let frontends share a pool; --pool-transports, checked)."""
    shared = cluster.get("transport") or "object_ref"
    if not spec_of(shared).shared_pool:
        raise SystemExit(
            f"mixserve bench serve: --transport {shared} cannot share a pool ({spec_of(shared).why_not_shared})"
        )
    transports = list(dict.fromkeys(t.strip() for t in flag.split(",") if t.strip()))
    for t in transports:
        if t not in SERVE_NAMES:
            raise SystemExit(f"mixserve bench serve: --pool-transports takes {', '.join(SERVE_NAMES)}, not {t!r}")
    if shared not in transports:
        raise SystemExit(f"mixserve bench serve: --pool-transports must include --transport ({shared}): the goals")
    return shared, transports


def run(o: Options, cluster: dict[str, Any]) -> dict:
    """``mixserve bench serve``: --workload pooling runs ``cluster.bench.serve_pooling.run``; without
    --frontend-replicas, ``cluster.bench.serve.run`` (the concurrency sweep);
    with it, both cases for every M (module docstring), then the table, goals and report."""
    if o.workload not in ("generate", "pooling"):
        raise SystemExit(f"mixserve bench serve: --workload is generate or pooling, not {o.workload!r}")
    if o.workload == "pooling":
        if o.frontend_replicas is not None:
            raise SystemExit("mixserve bench serve: --workload pooling runs without --frontend-replicas")
        return serve_pooling.run(o, cluster)
    if o.frontend_replicas is None:
        return serve_bench.run(o, cluster)
    ms = sorted(set(h.ints(o.frontend_replicas, "frontend-replicas")))
    if o.url:
        raise SystemExit("mixserve bench serve: --frontend-replicas deploys its own applications; drop --url")
    total = o.pool_concurrency or max(h.ints(o.concurrency, "concurrency"))
    if total < max(ms):
        raise SystemExit(f"mixserve bench serve: total concurrency {total} < {max(ms)} frontends (--pool-concurrency)")
    load = (total, o.requests_per_level or max(8, 2 * total))
    shared, transports = pool_transports(cluster, o.pool_transports)
    r, port, cpus = h.Run("serve", o), free_port(), ray_cpus(cluster, ms)
    base = f"http://127.0.0.1:{port}"
    with h.local_ray(cpus):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            rows = [measure(o, cluster, base, case, load, r) for case in cases(ms, shared, transports)]
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
    compare_with_one_pool(rows, shared)
    cols = ["m", "case", "transport", "clients", "requests", "errors", "tokens_per_s", "vs_one_pool", "ttft_ms_p50"]
    cols += ["itl_ms_p50", "itl_ms_p99", "expert_mb", "rows_per_matmul", "per_frontend"]
    w = cluster["expert_workers"]
    tables = [h.table(rows, cols, title=f"M frontends over one pool vs M pools (W={w} each, {total} clients in all)")]
    settings = {"server": "in-process", "port": port, "cluster": cluster, "frontend_replicas": ms}
    settings["pool_transports"] = transports
    settings.update(total_concurrency=total, requests=load[1], ray_cpus=cpus, api_key="***" if o.api_key else None)
    results = {"cases": rows}
    return r.finish(settings=settings, method=__doc__, results=results, goals=goals_of(rows, ms, shared), tables=tables)
