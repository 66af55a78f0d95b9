"""Continuous-batching engine: scheduler (KV slots, admission, chunked prefill), engine core (step, sampling,
stops) and the async engine used by the Serve frontend. Imports no model code: it drives any
``cluster.step.Executor``."""

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.engine.core import EngineCore
from cluster.engine.request import FinishReason, RequestOutput

__all__ = ["AsyncEngine", "EngineConfig", "EngineCore", "FinishReason", "RequestOutput"]
