"""``mixserve bench serve --workload pooling``: pooled requests per second over HTTP against transformers' batched
forward on the same inputs.

The application is deployed in-process (W expert workers; ``--url`` targets a running server instead). Each request
is one input of token ids (fixed seed, lengths uniform in prompt_len): ``POST /v1/embeddings`` on a causal LM
(last-token pooling, L2-normalized), ``POST /classify`` on a ``MixtralForSequenceClassification`` checkpoint.
Closed loop: at concurrency c, c clients each send their next request when the previous one ends, until the level's
requests (max(8, 2c)) are done. requests/s: successful requests / level wall time. The peer a user would otherwise
run is transformers itself: the same inputs as batches of c (right-padded, an attention mask, the last real token
pooled) through ``MixtralModel`` / ``MixtralForSequenceClassification`` in this process, in the server's dtype.
Every served vector is compared with transformers' (``max_abs_diff``).
"""

from __future__ import annotations

import asyncio
import random
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from cluster.bench import harness as h
from cluster.bench.serve import Options, deploy, free_port
from cluster.checkpoint.load import parse_dtype
from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig


def inputs(o: Options, n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(o.seed)
    lo, hi = h.ints(o.prompt_len, "prompt-len", span=True)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi) - 1)] for _ in range(n)]


async def level(o: Options, url: str, classify: bool, prompts: list[list[int]], c: int) -> tuple[list, list, float]:
    """Closed loop at concurrency ``c``: (vectors in prompt order (None: failed), errors, wall seconds)."""
    import httpx  # optional dependency (the test extra): only the serve benchmarks need it

    path, key = ("/classify", "probs") if classify else ("/v1/embeddings", "embedding")
    headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
    out: list[list[float] | None] = [None] * len(prompts)
    errors: list[str] = []
    todo = list(range(len(prompts)))[::-1]
    async with httpx.AsyncClient(timeout=o.request_timeout_s) as client:

        async def loop() -> None:
            while todo:
                i = todo.pop()
                try:
                    r = await client.post(url + path, json={"input": prompts[i]}, headers=headers)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                        continue
                    out[i] = r.json()["data"][0][key]
                except Exception as e:  # a failed request counts as an error; the level goes on
                    errors.append(f"{type(e).__name__}: {e}"[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(c)))
        return out, errors, time.perf_counter() - t0


def reference(folder: str, dtype: torch.dtype, classify: bool) -> Any:
    from transformers import MixtralForSequenceClassification, MixtralModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = MixtralForSequenceClassification if classify else MixtralModel
        return cls.from_pretrained(folder, dtype=dtype).eval()


@torch.inference_mode()
def transformers_vectors(model: Any, prompts: list[list[int]], batch: int, classify: bool) -> tuple[list, float]:
    """The same inputs through transformers in batches of ``batch``: (vectors, seconds)."""
    vecs: list[list[float]] = []
    t0 = time.perf_counter()
    for at in range(0, len(prompts), batch):
        part = prompts[at : at + batch]
        width = max(map(len, part))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in part])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in part])
        last = torch.tensor([len(p) - 1 for p in part])
        if classify:
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = model.score(h[torch.arange(len(part)), last]).float()
            vecs += (torch.sigmoid(pooled) if pooled.shape[1] == 1 else pooled.softmax(-1)).tolist()
        else:
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            vecs += F.normalize(h[torch.arange(len(part)), last].float(), dim=-1).tolist()
    return vecs, time.perf_counter() - t0


def measure(o: Options, url: str, folder: str, dtype: torch.dtype, levels: list[int], r: h.Run) -> list[dict]:
    config = ModelConfig.from_dir(folder)
    classify = not config.can_generate
    ref = reference(folder, dtype, classify)
    rows = []
    for c in levels:
        prompts = inputs(o, o.requests_per_level or max(8, 2 * c), config.vocab_size)
        r(f"concurrency {c}: {len(prompts)} {'classify' if classify else 'embedding'} requests")
        asyncio.run(level(o, url, classify, prompts[:1], 1))  # warm-up
        served, errors, wall = asyncio.run(level(o, url, classify, prompts, c))
        want, ref_s = transformers_vectors(ref, prompts, c, classify)
        diffs = [max(abs(a - b) for a, b in zip(s, w, strict=True)) for s, w in zip(served, want, strict=True) if s]
        ok = sum(v is not None for v in served)
        rows.append({
            "concurrency": c, "requests": len(prompts), "errors": len(errors), "first_errors": errors[:3],
            "requests_per_s": ok / wall, "transformers_per_s": len(prompts) / ref_s,
            "vs_transformers": h.ratio(ok / wall, len(prompts) / ref_s), "max_abs_diff": max(diffs, default=None),
        })  # fmt: skip
        r(f"concurrency {c}: {h.fmt(rows[-1]['requests_per_s'])} requests/s (transformers "
          f"{h.fmt(rows[-1]['transformers_per_s'])}/s)")  # fmt: skip
    return rows


def run(o: Options, cluster: dict[str, Any]) -> dict:
    levels = sorted(set(h.ints(o.concurrency, "concurrency")))
    config = resolve(ClusterConfig.create(model=o.model, dtype=cluster.get("dtype", "auto")))
    folder, dtype = str(config.load.model), parse_dtype(config.load.dtype)
    r, w = h.Run("serve", o), cluster["expert_workers"]
    if o.url:
        where, rows = {"server": "external"}, measure(o, o.url.rstrip("/"), folder, dtype, levels, r)
    else:
        from ray import serve

        port = free_port()
        where, url = {"server": "in-process", "port": port}, f"http://127.0.0.1:{port}"
        with h.local_ray(6 + w):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                rows = measure(
                    o, deploy(o, {**cluster, "dtype": config.load.dtype}, url, w, r), folder, dtype, levels, r
                )
            finally:
                serve.shutdown()
    cols = ["concurrency", "requests", "errors", "requests_per_s", "transformers_per_s", "vs_transformers"]
    tables = [h.table(rows, [*cols, "max_abs_diff"], title=f"pooled requests (W={w}, {config.load.dtype})")]
    goals = [
        h.goal("error rate == 0 at every level", max(x["errors"] for x in rows), 0, at_least=False),
        h.goal("served vectors within 1e-3 of transformers'", max((x["max_abs_diff"] or 0) for x in rows), 1e-3,
               at_least=False),
    ]  # fmt: skip
    settings = {**where, "workload": "pooling", "dtype": config.load.dtype, "cluster": cluster}
    return r.finish(settings=settings, method=__doc__, results={"levels": rows}, goals=goals, tables=tables)
