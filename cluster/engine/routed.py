"""Routed experts per token (``return_routed_experts``): which experts of every layer each token of a request was
sent to, for Rollout Routing Replay and routing analysis (vLLM's ``CompletionOutput.routed_experts``, SGLang's
``return_routed_experts``).

Every token that runs through the model is routed once: the prompt's tokens and every generated token but the last
(the last one is sampled and never fed back), so a request of p prompt and g generated tokens reports p + g - 1
rows. Rows are collected as the request's chunks run. Positions a prefix-cache hit skipped were routed when an
earlier request computed them, and the model runner keeps that beside the KV cache
(``Executor.routed_experts``): they are read from the cached blocks before the step can reuse any block.

Example (block size 4): a 10-token prompt whose first 8 tokens are cached: the first step reads rows 0-7 from the
two cached blocks, then adds rows 8-9 from its own chunk; each later decode step adds one row.

Shapes: N rows (positions), L layers, K experts per token.
"""

from __future__ import annotations

import numpy as np
import torch


class RoutedExperts:
    """One request's rows so far, in position order."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []  # [n, L, K] int16 on the CPU
        self.count = 0  # positions 0 .. count - 1 are collected

    def add(self, start: int, rows: torch.Tensor) -> None:
        """rows [n, L, K] of positions ``start ..``: the ones not collected yet are kept (a preempted request
        recomputes positions it already reported)."""
        skip = self.count - start
        if skip < 0:
            raise AssertionError(f"routed experts of positions {self.count}..{start - 1} were never collected")
        if skip < rows.shape[0]:
            new = rows[skip:].cpu()
            self.parts.append(new)
            self.count += int(new.shape[0])

    def array(self) -> np.ndarray:
        """[N, L, K] int16: the expert ids, position by position."""
        if not self.parts:
            return np.zeros((0, 0, 0), dtype=np.int16)
        return torch.cat(self.parts).numpy()
