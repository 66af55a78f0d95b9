"""The contract between the scheduler and whatever runs the model: a typed step batch and the executor protocol.

The scheduler (``cluster.engine``) decides which sequences run, which of their tokens and in which KV-cache blocks;
an :class:`Executor` (``workers.runner.ModelRunner``, or a fake in the scheduler's tests) runs that batch and
returns the logits of the rows that are sampled. Neither side imports the other.

Shapes: T tokens in the step, R rows whose logits are wanted, V vocabulary.
"""

from __future__ import annotations

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

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


class Executor(Protocol):
    """Runs step batches over a paged KV cache of ``num_blocks`` blocks of ``block_size`` positions, whose blocks
    the scheduler hands out."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Write the batch's keys/values into its blocks; return float32 logits [R, V] for ``batch.logit_rows``."""
        ...
