"""One step's rows and whom they belong to: the scheduled chunks laid end to end as a
:class:`~cluster.engine.step.StepBatch`, and, once it ran, each request's share of the
:class:`~cluster.engine.step.StepOutput` (its sampled logits, scored prompt tokens, pooled hidden states and routed
experts).

Rows asked for, in this order: ``logit_rows`` = the sampled rows (the last token of each chunk that reaches its
request's newest token), then the prompt rows scored for ``prompt_logprobs``; ``hidden_rows`` = the pooled rows of
pooling requests (``cluster.engine.pooling``).

Example: a decode of request a (position 9) and a 3-token first chunk of pooling request b (mean) -> tokens
[a9, b0, b1, b2], logit_rows [0], hidden_rows [1, 2, 3]; b finishes only if its prompt is 3 tokens long.
"""

from __future__ import annotations

import torch

from cluster.engine.request import Request
from cluster.engine.sampling import logprobs_of
from cluster.engine.step import SeqChunk, StepBatch, StepOutput


class StepLayout:
    def __init__(self, scheduled: list[tuple[Request, SeqChunk]]) -> None:
        self.scheduled = scheduled
        self.tokens: list[int] = []
        self.firsts: list[int] = []  # each chunk's first row
        self.sample_rows: list[int] = []
        self.sampled: list[Request] = []  # requests whose next token this step picks
        self.prompt_rows: list[int] = []  # rows whose logits score the next prompt token (prompt_logprobs)
        self.scored: list[tuple[Request, int]] = []  # (request, position of the prompt token scored)
        self.hidden_rows: list[int] = []
        self.pooled: list[tuple[Request, int]] = []  # (pooling request, how many of hidden_rows are its)
        self.pooled_done: list[Request] = []  # pooling requests whose last prompt token runs in this step
        for req, chunk in scheduled:
            self._lay_out(req, chunk)

    def _lay_out(self, req: Request, chunk: SeqChunk) -> None:
        first = len(self.tokens)
        self.firsts.append(first)
        self.tokens.extend(req.all_tokens[chunk.start : chunk.start + chunk.n])
        end = chunk.start + chunk.n
        if req.pool is not None:
            rows = [first + p - chunk.start for p in req.pool.positions(chunk.start, chunk.n)]
            self.hidden_rows.extend(rows)
            self.pooled.append((req, len(rows)))
            if end == len(req.prompt):
                self.pooled_done.append(req)
            return
        if req.params.prompt_logprobs is not None:
            # positions not scored yet (a preempted request recomputes its prompt but is not scored twice)
            for p in range(max(chunk.start, len(req.prompt_logprobs)), min(end, len(req.prompt) - 1)):
                self.prompt_rows.append(first + p - chunk.start)
                self.scored.append((req, p + 1))
        if end == len(req.all_tokens):  # the chunk reaches the newest token: sample
            self.sample_rows.append(len(self.tokens) - 1)
            self.sampled.append(req)

    def batch(self) -> StepBatch:
        return StepBatch(
            token_ids=torch.tensor(self.tokens, dtype=torch.int64),
            chunks=tuple(chunk for _, chunk in self.scheduled),
            logit_rows=torch.tensor(self.sample_rows + self.prompt_rows, dtype=torch.int64),
            first_step=not any(req.steps for req, _ in self.scheduled),
            hidden_rows=torch.tensor(self.hidden_rows, dtype=torch.int64) if self.hidden_rows else None,
        )

    def record(self, out: StepOutput) -> torch.Tensor:
        """Give each request its share of ``out`` (prompt logprobs, pooled rows, routed experts); the sampled rows'
        logits [S, V] are returned."""
        for (req, pos), row in zip(self.scored, out.logits[len(self.sample_rows) :], strict=True):
            req.prompt_logprobs.append(logprobs_of(row, req.prompt[pos], req.params.prompt_logprobs or 0))
        at = 0
        for req, n in self.pooled:
            assert req.pool is not None
            if n:
                assert out.hidden is not None
                scores = out.scores[at : at + n] if out.scores is not None else None
                req.pool.add(out.hidden[at : at + n], scores)
            at += n
        if out.routed is not None:
            for (req, chunk), first in zip(self.scheduled, self.firsts, strict=True):
                if req.routed is not None:
                    req.routed.add(chunk.start, out.routed[first : first + chunk.n])
        return out.logits[: len(self.sample_rows)]
