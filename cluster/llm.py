"""Offline API: ``LLM(model=DIR).generate(prompts, params)``, in-process (W = 0) or sharded over Ray (W >= 1)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from cluster.builder import ClusterConfig, Frontend, build_frontend
from cluster.config import ModelConfig
from cluster.engine import RequestOutput
from cluster.errors import InvalidRequestError
from cluster.sampling import SamplingParams
from cluster.tokenizer import Tokenizer

PromptLike = str | Sequence[str] | Sequence[Sequence[int]]


class LLM:
    """A Mixtral-architecture model ready to generate.

    ``options`` are the fields of :class:`~cluster.builder.ClusterConfig` (dtype, expert_workers, transport,
    engine limits, placement, ...); an unknown or invalid one is a ``SetupError`` naming it.
    ``expert_workers=0`` (the default) runs everything in this process, the reference path;
    ``expert_workers=W >= 1`` starts W expert-worker actors and a frontend actor on Ray (an already-initialised
    Ray, ``address=``, or a new local one) and routes every layer's tokens between them.
    """

    def __init__(self, model: str | Path, *, address: str | None = None, progress: bool = True, **options: Any) -> None:
        self.config = ClusterConfig.create(model=str(model), **options)
        self.tokenizer = Tokenizer.from_dir(self.config.model, tokenizer=self.config.tokenizer)
        self._frontend: Frontend | None = None
        self._cluster = None
        if self.config.expert_workers == 0:
            self._frontend = build_frontend(self.config, progress=progress)
        else:
            from cluster.cluster import ExpertCluster  # imports Ray: only for a sharded model

            placement = self.config.placement(ModelConfig.from_dir(self.config.model))
            self._cluster = ExpertCluster.start(self.config, placement, address=address, progress=progress)

    # ------------------------------------------------------------------ API
    def _encode(self, prompts: PromptLike) -> list[list[int]]:
        if isinstance(prompts, str):
            return [self.tokenizer.encode(prompts)]
        items = list(prompts)
        if not items:
            raise InvalidRequestError("no prompts given", param="prompts")
        if all(isinstance(p, str) for p in items):
            return [self.tokenizer.encode(p) for p in items if isinstance(p, str)]
        if all(isinstance(p, (list, tuple)) for p in items):
            # token ids: the engine checks every one (an int in [0, vocab)) and names the prompt when one is not
            return [cast(list[int], list(p)) for p in items]
        raise InvalidRequestError("prompts must be a string, a list of strings or a list of token-id lists")

    def generate(
        self,
        prompts: PromptLike,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Finished :class:`RequestOutput` s in prompt order: ``n`` per prompt (one by default; with a seed,
        choice j samples with seed + j; with ``best_of`` > n, the n most likely of best_of, best first). Prompts
        are batched continuously.

        A request that fails in a step raises its error (``ExpertWorkerError`` when a worker was lost).
        """
        ids = self._encode(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(ids)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(ids)
        else:
            params = list(sampling_params)
            if len(params) != len(ids):
                raise InvalidRequestError(f"{len(params)} sampling params for {len(ids)} prompts")
        flat_ids, flat_params, spans = expand_choices(ids, params)
        if self._cluster is not None:
            outs = self._cluster.generate(flat_ids, flat_params)
        else:
            outs = self._local().core.generate(flat_ids, flat_params)
        for o in outs:
            if o.error is not None:
                raise o.error
        return [o for span in spans for o in pick(outs, span)]

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence float32 logits, shape [len(token_ids), vocab]."""
        if self._cluster is not None:
            return self._cluster.logits(list(token_ids))
        return self._local().core.logits(list(token_ids))

    def placement(self, timeout_s: float = 10.0) -> list[dict]:
        """Per worker: its experts, node id, GPU ids and bytes of expert weights it holds (a worker that does not
        answer within ``timeout_s``: its experts and the error)."""
        if self._cluster is not None:
            return self._cluster.placement(timeout_s)
        info = self._local().info()
        return [
            {
                "worker": "in-process",
                "experts": "all",
                "node_id": None,
                "gpu_ids": [],
                "expert_bytes": info["expert_bytes"],
            }
        ]

    def health(self, timeout_s: float = 3.0) -> dict:
        """``ok``, one entry per expert worker (``ok``, its load time and pid, or the error) and the
        ``missing_experts`` ([layer, expert] with no live copy); in-process experts are always there."""
        if self._cluster is not None:
            return self._cluster.health(timeout_s)
        self._local()
        return {"ok": True, "workers": [], "missing_experts": []}

    def frontend_info(self) -> dict:
        if self._cluster is not None:
            return self._cluster.frontend_info()
        return self._local().info()

    def expert_load(self) -> list[list[int]]:
        """Tokens routed so far, [layer][expert]."""
        if self._cluster is not None:
            return self._cluster.expert_load()
        return self._local().expert_load()

    def _local(self) -> Frontend:
        if self._frontend is None:
            raise RuntimeError("this LLM has been shut down")
        return self._frontend

    def shutdown(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
        self._frontend = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


Span = tuple[int, int, SamplingParams]  # (first engine request, candidates, the prompt's params)


def expand_choices(
    prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[list[int]], list[SamplingParams], list[Span]]:
    """One engine request per candidate: best_of (else n) per prompt, candidate j seeded with seed + j (logprobs
    kept to rank best_of candidates, dropped again by :func:`pick`)."""
    flat_ids: list[list[int]] = []
    flat_params: list[SamplingParams] = []
    spans: list[Span] = []
    for p, sp in zip(prompts, params, strict=True):
        k = sp.best_of or sp.n
        spans.append((len(flat_ids), k, sp))
        for j in range(k):
            seed = sp.seed + j if sp.seed is not None and k > 1 else sp.seed
            logprobs = 0 if k > sp.n and sp.logprobs is None else sp.logprobs
            flat_params.append(dataclasses.replace(sp, seed=seed, n=1, best_of=None, logprobs=logprobs))
            flat_ids.append(p)
    return flat_ids, flat_params, spans


def pick(outs: list[RequestOutput], span: Span) -> list[RequestOutput]:
    """A prompt's n outputs: all its candidates, or with best_of the n most likely (highest summed logprob)."""
    start, k, sp = span
    group = outs[start : start + k]
    if k > sp.n:
        group = sorted(group, key=lambda o: -sum(lp.logprob for lp in o.logprobs or []))[: sp.n]
        if sp.logprobs is None:
            for o in group:
                o.logprobs = o.new_logprobs = None
    return group
