"""Offline API: ``LLM(model=DIR).generate(prompts, params)``, in-process (W = 0) or sharded over Ray (W >= 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.engine import fanout
from cluster.engine.request import RequestOutput
from cluster.engine.sampling import SamplingParams
from cluster.errors import InvalidRequestError
from cluster.runtime.local import LocalFrontend
from cluster.text.tokenizer import Tokenizer

PromptLike = str | Sequence[str] | Sequence[Sequence[int]]


class LLM:
    """A Mixtral-architecture model ready to generate.

    ``options`` are the options of :class:`~cluster.config.cluster.ClusterConfig` (dtype, expert_workers,
    transport, engine limits, placement, ...); an unknown or invalid one is a ``SetupError`` naming it.
    ``expert_workers=0`` (the default) runs everything in this process, the reference path;
    ``expert_workers=W >= 1`` starts a frontend actor with W expert-worker actors on Ray (an already-initialised
    Ray, ``address=``, or a new local one sized for them) and routes every layer's tokens between them.
    """

    def __init__(self, model: str | Path, *, address: str | None = None, progress: bool = True, **options: Any) -> None:
        self.config = resolve(ClusterConfig.create(model=str(model), **options))
        load = self.config.load
        assert load.model is not None
        self.tokenizer = Tokenizer.from_dir(load.model, tokenizer=load.tokenizer)
        self._frontend: Any = None
        if self.config.parallel.expert_workers == 0:
            self._frontend = LocalFrontend(self.config, progress=progress)
        else:
            from cluster.runtime.offline import RemoteFrontend  # imports Ray: only for a sharded model

            self._frontend = RemoteFrontend.start(self.config, address=address, progress=progress)

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
        choice j samples with seed + j; with ``best_of`` > n, the n most likely of best_of, best first:
        ``cluster.engine.fanout``). Prompts are batched continuously.

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
        flat_ids = [p for p, sp in zip(ids, params, strict=True) for _ in range(sp.candidates)]
        flat_params = [c for sp in params for c in fanout.expand(sp)]
        outs = self._live().generate(flat_ids, flat_params)
        for o in outs:
            if o.error is not None:
                raise o.error
        kept: list[RequestOutput] = []
        start = 0
        for sp in params:
            kept += fanout.chosen(outs[start : start + sp.candidates], sp)
            start += sp.candidates
        return kept

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence float32 logits, shape [len(token_ids), vocab]."""
        return self._live().logits(list(token_ids))

    def apply_model(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(model)`` run where the model is (this process, or the frontend actor), between calls; its result
        comes back (as vLLM's ``LLM.apply_model``). ``model`` is ``workers.model.MixtralModel``."""
        return self._live().apply(lambda runtime: fn(runtime.frontend.model))

    def placement(self, timeout_s: float = 10.0) -> list[dict]:
        """Per worker: its experts, node id, GPU ids, pid and bytes of expert weights it holds (a worker that does
        not answer within ``timeout_s``: its experts and the error)."""
        return self._live().placement(timeout_s)

    def health(self, timeout_s: float = 3.0) -> dict:
        """``ok``, one entry per expert worker (``ok``, its load time and pid, or the error) and the
        ``missing_experts`` ([layer, expert] with no live copy); in-process experts are always there."""
        return self._live().health(timeout_s)

    def frontend_info(self) -> dict:
        """The frontend's device, memory, KV cache, engine counters, threads, failovers, node and GPUs."""
        return self._live().info()

    def expert_load(self) -> list[list[int]]:
        """Tokens routed so far, [layer][expert]."""
        return self._live().expert_load()

    def _live(self) -> Any:
        if self._frontend is None:
            raise RuntimeError("this LLM has been shut down")
        return self._frontend

    def shutdown(self) -> None:
        if self._frontend is not None:
            self._frontend.shutdown()
            self._frontend = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
