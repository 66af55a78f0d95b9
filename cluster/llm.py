"""Offline API: ``LLM(model=DIR).generate(prompts, params)``, in-process (W = 0) or sharded over Ray (W >= 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.engine import EngineConfig, RequestOutput
from cluster.errors import InvalidRequestError
from cluster.sampling import SamplingParams

PromptLike = str | Sequence[str] | Sequence[Sequence[int]]


class LLM:
    """A Mixtral-architecture model ready to generate.

    ``expert_workers=0`` runs everything in this process (the reference path). ``expert_workers=W >= 1`` starts
    W expert-worker actors and a frontend actor on Ray (an already-initialised Ray, ``address=``, or a new local
    one) and routes every layer's tokens between them.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        expert_workers: int = 0,
        dtype: str = "float32",
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 512,
        max_queued_requests: int = 256,
        max_model_len: int | None = None,
        attention_backend: str = "auto",
        device: str | None = None,
        address: str | None = None,
        gpus_per_worker: float | None = None,
        placement_strategy: str = "PACK",
        transport: str = "object_ref",
        expert_placement: Sequence[Sequence[int]] | None = None,
        progress: bool = True,
    ) -> None:
        from cluster.tokenizer import Tokenizer

        if isinstance(expert_workers, bool) or not isinstance(expert_workers, int) or expert_workers < 0:
            raise ValueError(f"expert_workers must be an integer >= 0, got {expert_workers!r}")
        self.model = str(model)
        self.expert_workers = expert_workers
        self.engine_config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queued_requests=max_queued_requests,
            max_model_len=max_model_len,
        )
        self.tokenizer = Tokenizer.from_dir(self.model)
        self._cluster = None
        if expert_workers == 0:
            from workers.frontend import Frontend

            self._frontend: Any = Frontend(
                model=self.model,
                dtype=dtype,
                engine=self.engine_config,
                attention_backend=attention_backend,
                device=device,
                progress=progress,
            )
        else:
            from cluster.cluster import ExpertCluster

            self._cluster = ExpertCluster.start(
                model=self.model,
                expert_workers=expert_workers,
                dtype=dtype,
                engine=self.engine_config,
                attention_backend=attention_backend,
                address=address,
                gpus_per_worker=gpus_per_worker,
                placement_strategy=placement_strategy,
                transport=transport,
                expert_placement=expert_placement,
                progress=progress,
            )

    # ------------------------------------------------------------------ API
    def _encode(self, prompts: PromptLike) -> list[list[int]]:
        if isinstance(prompts, str):
            return [self.tokenizer.encode(prompts)]
        items = list(prompts)
        if not items:
            raise InvalidRequestError("no prompts given", param="prompts")
        if all(isinstance(p, str) for p in items):
            return [self.tokenizer.encode(p) for p in items]
        if all(isinstance(p, (list, tuple)) for p in items):
            return [list(p) for p in items]
        raise InvalidRequestError("prompts must be a string, a list of strings or a list of token-id lists")

    def generate(
        self,
        prompts: PromptLike,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished :class:`RequestOutput` per prompt, in order. Prompts are batched continuously."""
        ids = self._encode(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(ids)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(ids)
        else:
            params = list(sampling_params)
            if len(params) != len(ids):
                raise InvalidRequestError(f"{len(params)} sampling params for {len(ids)} prompts")
        outs = self._call("generate", ids, params)
        for o in outs:
            if o.finish_reason == "error":
                from cluster.errors import ExpertWorkerError

                raise ExpertWorkerError(f"request {o.request_id} failed: {o.error}")
        return outs

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Full-sequence float32 logits, shape [len(token_ids), vocab]."""
        return self._call("logits", list(token_ids))

    def placement(self) -> list[dict]:
        """Per worker: its experts, node id, GPU ids and bytes of expert weights it holds."""
        if self._cluster is None:
            info = self._frontend.info()
            return [
                {
                    "worker": "in-process",
                    "experts": "all",
                    "node_id": None,
                    "gpu_ids": [],
                    "expert_bytes": info["expert_bytes"],
                }
            ]
        return self._cluster.placement()

    def frontend_info(self) -> dict:
        return self._call("info")

    def expert_load(self) -> list[list[int]]:
        """Tokens routed so far, [layer][expert]."""
        return self._call("expert_load")

    def _call(self, method: str, *args: Any) -> Any:
        if self._cluster is None:
            return getattr(self._frontend, method)(*args)
        return self._cluster.call(method, *args)

    def shutdown(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
        self._frontend = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
