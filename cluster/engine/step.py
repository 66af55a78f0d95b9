"""The contract between the scheduler and whatever runs the model: a typed step batch and the executor protocol.

The scheduler (``cluster.engine``) decides which sequences run, which of their tokens and in which KV-cache blocks;
an :class:`Executor` (``workers.runner.ModelRunner``, or a fake in the scheduler's tests) runs that batch and
returns the logits of the rows that are sampled. Neither side imports the other.

Shapes: T tokens in the step, R rows whose logits are wanted, P rows whose hidden states are wanted, V vocabulary,
D hidden, C a classifier's labels, L layers, K experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

FREED = -1  # a block-table entry whose block a sliding window has left behind (never read again)


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: ``n`` new tokens at positions ``start .. start + n - 1``.

    ``blocks`` is the sequence's block table: logical block i (positions ``i * block_size`` to
    ``(i + 1) * block_size - 1``) lives in physical KV block ``blocks[i]``; it covers every position up to
    ``start + n - 1``. Entries a sliding window has left are ``FREED``.
    """

    start: int
    n: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class StepBatch:
    """One step: the chunks laid end to end form the flat token axis.

    token_ids   [T]  the new tokens of every chunk, in chunk order
    chunks           one per scheduled sequence
    logit_rows  [R]  rows of the token axis whose next-token logits are wanted (the last token of each chunk
                     that reaches its sequence's newest token)
    hidden_rows [P]  rows whose final hidden states (after the last norm) are wanted: pooling requests' rows
    first_step       no sequence of the batch has run a step before (a prefix found in the prefix cache does not
                     count): nothing in flight depends on what the expert workers' processes computed so far

    Example (block size 4): a decode at position 5 of a sequence in blocks [7, 2] and a 3-token prefill of a new
    one in block [4] -> token_ids [t5, p0, p1, p2], chunks [SeqChunk(5, 1, (7, 2)), SeqChunk(0, 3, (4,))],
    logit_rows [0, 3].
    """

    token_ids: torch.Tensor
    chunks: tuple[SeqChunk, ...]
    logit_rows: torch.Tensor
    first_step: bool = False
    hidden_rows: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True)
class StepOutput:
    """What a step computed.

    logits  [R, V] float32  next-token logits of ``logit_rows``
    hidden  [P, D] float32  final hidden states of ``hidden_rows`` (None when none were asked for)
    scores  [P, C] float32  a classifier's score head over ``hidden`` (None without one, or without hidden rows)
    routed  [T, L, K]       the experts every token of the step was routed to, per layer (None from an executor
                            that does not record them)
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    routed: torch.Tensor | None = None


class Executor(Protocol):
    """Runs step batches over a paged KV cache of ``num_blocks`` blocks of ``block_size`` positions, whose blocks
    the scheduler hands out."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def execute(self, batch: StepBatch) -> StepOutput:
        """Write the batch's keys/values (and the tokens' routed experts) into its blocks; return the rows asked
        for."""
        ...

    def routed_experts(self, blocks: Sequence[int]) -> torch.Tensor:
        """The routed experts recorded for every position of these blocks, [len(blocks) * block_size, L, K]: what a
        request whose prefix was found in the prefix cache reports for the positions it did not compute."""
        ...
