"""A frontend deployment whose model step fails with a RuntimeError whenever its batch holds POISON_TOKEN: a bug
that is not a worker's, injected by the tests without test-only code in mixserve (the subclass wraps the real
engine's executor). Ray workers import this module (tests/ on their PYTHONPATH, see test_internal_errors.py)."""

from __future__ import annotations

from typing import Any

from cluster.engine.step import StepBatch, StepOutput
from cluster.serve.frontend import FrontendServer

POISON_TOKEN = 31337


class PoisonedExecutor:
    """The real executor, except that a batch with POISON_TOKEN raises."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def execute(self, batch: StepBatch) -> StepOutput:
        if POISON_TOKEN in batch.token_ids.tolist():
            raise RuntimeError("injected step failure: poison token in the batch")
        return self._inner.execute(batch)


class FaultyFrontendServer(FrontendServer):
    def __init__(self, args: dict[str, Any]) -> None:
        super().__init__(args)
        core = self.frontend.core
        core.executor = PoisonedExecutor(core.executor)
