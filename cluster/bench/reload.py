"""``mixserve bench reload``: how long an expert worker takes to load its experts again after a restart, against
the disk.

A multi-GB checkpoint is written once by the tiny-model writer (random weights, bf16 by default). Then, for the
experts of worker 0 of W: (1) ``dd`` of the checkpoint file to /dev/null (the disk's sequential read rate) and
(2) ``ExpertShard.load`` of that worker's experts (what a restarted worker does), each with a cold page cache
(``/proc/sys/vm/drop_caches``, when writable) and with a warm one. MB/s = bytes read / seconds; the load reads only
its experts' bytes (safetensors, memory-mapped), dd the whole file. MB = MiB.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.bench import harness as h
from cluster.bench.harness import Common, opt
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.config.model import ModelConfig
from router.placement import ExpertPlacement
from workers.expert import ExpertShard

MB = 1024 * 1024


@dataclass
class Options(Common):
    """expert reload time of one worker against dd of the same checkpoint"""

    cluster_flags = ("expert_workers",)
    cluster_defaults = {"expert_workers": 2}
    hidden: int = opt(2048, "hidden size of the written checkpoint")
    intermediate: int = opt(6144, "expert intermediate size of the written checkpoint")
    layers: int = opt(4, "layers of the written checkpoint")
    repeats: int = opt(2, "timed runs per case (the best counts)")


def drop_caches() -> bool:
    """Empty the page cache (root only); False when this machine does not allow it."""
    with contextlib.suppress(OSError):
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    return False


def timed(fn: Any, *, cold: bool) -> float | None:
    if cold and not drop_caches():
        return None
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(o: Options, cluster: dict[str, Any]) -> dict:
    r = h.Run("reload", o)
    spec = TinyModelSpec(hidden=o.hidden, intermediate=o.intermediate, layers=o.layers, heads=16, kv_heads=8)
    folder = checkpoint(o, spec, r)
    config = ModelConfig.from_dir(folder)
    placement = ExpertPlacement.contiguous(
        num_layers=config.num_layers, num_experts=config.num_experts, num_workers=cluster["expert_workers"]
    )
    rows = [reload_row(folder, config, placement.experts_of(0), cold, o.repeats, r) for cold in (True, False)]
    cols = ["page_cache", "dd_mb", "dd_s", "dd_mb_s", "load_mb", "load_s", "load_mb_s", "load_over_dd_rate"]
    tables = [h.table(rows, cols, title=f"reload of worker 0 of {cluster['expert_workers']} against dd")]
    settings = {"checkpoint": str(folder), "spec": spec.__dict__, "expert_workers": cluster["expert_workers"]}
    return r.finish(settings=settings, method=__doc__, results={"runs": rows}, goals=goals_of(rows), tables=tables)


def checkpoint(o: Options, spec: TinyModelSpec, r: h.Run) -> Path:
    """``--model``, else the checkpoint of ``spec`` under bench-results/, written (bf16) unless it is there."""
    folder = Path(o.model) if o.model else h.RESULTS_DIR / f"reload-{o.layers}x{o.hidden}x{o.intermediate}"
    if not (folder / "config.json").is_file():
        r(f"writing a {spec.layers}-layer checkpoint (hidden {spec.hidden}, intermediate {spec.intermediate}, bf16)")
        write_tiny_model(folder, spec, dtype=torch.bfloat16)
    return folder


def reload_row(
    folder: Path, config: ModelConfig, experts: list[tuple[int, int]], cold: bool, repeats: int, r: h.Run
) -> dict[str, Any]:
    """dd of the checkpoint files, then ``ExpertShard.load`` of ``experts``, each the best of ``repeats``, with a
    cold (``cold``) or warm page cache; a row with a note when the page cache cannot be dropped."""
    files = sorted(folder.glob("*.safetensors"))
    file_bytes = sum(f.stat().st_size for f in files)
    state = "cold" if cold else "warm"
    r(f"dd of {file_bytes / MB:.0f} MB, {state} page cache")

    def dd() -> None:
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)

    dd_s = [t for t in (timed(dd, cold=cold) for _ in range(repeats)) if t is not None]
    r(f"loading worker 0's {len(experts)} experts, {state} page cache")
    held = 0

    def load() -> None:
        nonlocal held
        shard = ExpertShard.load(folder, config, experts, dtype="bfloat16", progress=False)
        held = shard.nbytes()

    load_s = [t for t in (timed(load, cold=cold) for _ in range(repeats)) if t is not None]
    if not dd_s or not load_s:
        return {"page_cache": state, "note": "cannot drop the page cache here"}
    dd_rate, load_rate = file_bytes / MB / min(dd_s), held / MB / min(load_s)
    return {
        "page_cache": state,
        "dd_mb": file_bytes / MB,
        "dd_s": min(dd_s),
        "dd_mb_s": dd_rate,
        "load_mb": held / MB,
        "load_s": min(load_s),
        "load_mb_s": load_rate,
        "load_over_dd_rate": load_rate / dd_rate,
    }


def goals_of(rows: list[dict[str, Any]]) -> list[dict]:
    """The cold reload's MB/s against dd's; unmeasured (met None) where the page cache could not be dropped."""
    measured = next((x.get("load_over_dd_rate") for x in rows if x["page_cache"] == "cold"), None)
    return [
        h.goal(
            "cold reload MB/s >= 0.5x dd MB/s of the same checkpoint",
            measured,
            0.5,
            at_least=True,
            note=None if measured is not None else "the page cache could not be dropped",
        )
    ]
