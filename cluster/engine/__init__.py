"""Continuous-batching engine: the step contract with the executor (``step``), sampling parameters and the batched
sampler (``sampling``), structured output (``grammar``), n / best_of fan-out (``fanout``), KV blocks and the prefix
cache (``blocks``), the scheduler, the engine core and the async engine used by the Serve frontend. Imports no model
code: it drives any ``cluster.engine.step.Executor``.

The public names load lazily, so importing ``cluster.engine.step`` (as the model runner does) does not pull in the
scheduler or the engine core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config.engine import EngineConfig
    from cluster.engine.async_engine import AsyncEngine
    from cluster.engine.core import EngineCore
    from cluster.engine.request import FinishReason, RequestOutput

__all__ = ["AsyncEngine", "EngineConfig", "EngineCore", "FinishReason", "RequestOutput"]

_LAZY = {
    "AsyncEngine": "cluster.engine.async_engine",
    "EngineConfig": "cluster.config.engine",
    "EngineCore": "cluster.engine.core",
    "FinishReason": "cluster.engine.request",
    "RequestOutput": "cluster.engine.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cluster.engine' has no attribute {name!r}")
