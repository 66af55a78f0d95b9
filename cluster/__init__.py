"""mixserve: expert-sharded serving of Mixtral-architecture MoE models on Ray.

The public names load lazily, so ``import cluster.errors`` or ``import cluster.config.model`` pulls in neither torch's
model code, the engine nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.engine import RequestOutput
    from cluster.engine.pooling import PoolingParams
    from cluster.engine.sampling import SamplingParams
    from cluster.llm import LLM

__all__ = ["LLM", "PoolingParams", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_LAZY = {
    "LLM": "cluster.llm",
    "PoolingParams": "cluster.engine.pooling",
    "RequestOutput": "cluster.engine",
    "SamplingParams": "cluster.engine.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
