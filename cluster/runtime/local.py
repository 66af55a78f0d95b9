"""The offline API's frontend in this process (:class:`LocalFrontend`): a frontend runtime with every expert
in-process (W = 0), the reference path. No Ray is imported; the same calls as ``cluster.runtime.offline``'s
:class:`~cluster.runtime.offline.RemoteFrontend`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cluster.config.cluster import ClusterConfig
from cluster.engine.request import Params, RequestOutput
from cluster.runtime.runtime import FrontendRuntime


class LocalFrontend:
    def __init__(self, config: ClusterConfig, *, progress: bool = True) -> None:
        self.runtime = FrontendRuntime(config, progress=progress)

    def generate(
        self,
        prompts: list[list[int]],
        params: list[Params],
        progress: Callable[[int, int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """``progress(i, prompt tokens, output tokens)`` as engine request i finishes."""
        done = None if progress is None else lambda i, o: progress(i, len(o.prompt_token_ids), len(o.token_ids))
        return self.runtime.frontend.core.generate(prompts, params, done)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.runtime.frontend.core.logits(token_ids)

    def apply(self, fn: Callable[[FrontendRuntime], Any]) -> Any:
        return fn(self.runtime)

    def info(self) -> dict:
        return {**self.runtime.frontend.info(), "node_id": None, "gpu_ids": []}

    def expert_load(self) -> list[list[int]]:
        return self.runtime.frontend.expert_load()

    def health(self, timeout_s: float = 3.0) -> dict:
        return self.runtime.health(timeout_s)

    def placement(self, timeout_s: float = 10.0) -> list[dict]:
        return self.runtime.placement(timeout_s)

    def heal(self, timeout_s: float = 30.0) -> list[str]:
        return self.runtime.heal(timeout_s)

    def shutdown(self) -> None:
        self.runtime.close()
