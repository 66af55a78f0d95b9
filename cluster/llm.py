"""Offline API: ``LLM(model=DIR).generate(prompts, params)``, in-process (W = 0) or sharded over Ray (W >= 1)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cluster.checkpoint.locate import resolve
from cluster.config.cluster import ClusterConfig
from cluster.config.model import ModelConfig
from cluster.engine import fanout, scoring
from cluster.engine.outputs import prompt_output
from cluster.engine.pooled_outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from cluster.engine.pooling import PoolingParams, PoolingTask
from cluster.engine.request import RequestOutput
from cluster.engine.sampling import SamplingParams
from cluster.errors import InternalError, InvalidRequestError
from cluster.runtime.local import LocalFrontend
from cluster.text.chat_template import ChatOptions
from cluster.text.tokenizer import Tokenizer

# A prompt as vLLM takes it: text, token ids, {"prompt": text} or {"prompt_token_ids": ids}; one or a list.
Prompt = str | Sequence[int] | Mapping[str, Any]
PromptLike = Prompt | Sequence[Prompt]
Message = Mapping[str, Any]
ParamsLike = SamplingParams | Sequence[SamplingParams] | None


class _Progress:
    """A tqdm bar over prompts (a prompt is processed when all its choices are), with vLLM's token speeds."""

    def __init__(self, owners: list[int], prompts: int, bar: Callable[..., Any]) -> None:
        self.owners = owners  # engine request -> its prompt
        self.left = collections.Counter(owners)
        self.t0 = time.perf_counter()
        self.tokens_in = self.tokens_out = 0
        self.bar = bar(total=prompts, desc="Processed prompts", dynamic_ncols=True)

    def __call__(self, request: int, prompt_tokens: int, output_tokens: int) -> None:
        prompt = self.owners[request]
        self.left[prompt] -= 1
        self.tokens_out += output_tokens
        if self.left[prompt]:
            return
        self.tokens_in += prompt_tokens
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(
            f"est. speed input: {self.tokens_in / elapsed:.2f} toks/s, output: {self.tokens_out / elapsed:.2f} toks/s"
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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
        self.model_config = ModelConfig.from_dir(load.model)
        self._frontend: Any = None
        if self.config.parallel.expert_workers == 0:
            self._frontend = LocalFrontend(self.config, progress=progress)
        else:
            from cluster.runtime.offline import RemoteFrontend  # imports Ray: only for a sharded model

            self._frontend = RemoteFrontend.start(self.config, address=address, progress=progress)

    # ------------------------------------------------------------------ API
    def _prompt(self, item: Any) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of one prompt in any of vLLM's forms."""
        if isinstance(item, Mapping):
            if set(item) == {"prompt"} and isinstance(item["prompt"], str):
                return item["prompt"], self.tokenizer.encode(item["prompt"])
            if set(item) == {"prompt_token_ids"} and isinstance(item["prompt_token_ids"], (list, tuple)):
                return None, list(item["prompt_token_ids"])
            raise InvalidRequestError(
                f"a prompt dict is {{'prompt': text}} or {{'prompt_token_ids': [ids]}}, got keys {sorted(item)}",
                param="prompts",
            )
        if isinstance(item, str):
            return item, self.tokenizer.encode(item)
        if isinstance(item, (list, tuple)):
            # token ids: the engine checks every one (an int in [0, vocab)) and names the prompt when one is not
            return None, list(item)
        raise InvalidRequestError(
            f"a prompt is a string, a list of token ids or a dict, got {type(item).__name__}", param="prompts"
        )

    def _prompts(self, prompts: PromptLike) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, Mapping)):
            return [self._prompt(prompts)]
        items = list(prompts)
        if not items:
            raise InvalidRequestError("no prompts given", param="prompts")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
            return [self._prompt(items)]  # one prompt of token ids
        return [self._prompt(p) for p in items]

    def generate(
        self,
        prompts: PromptLike,
        sampling_params: ParamsLike = None,
        use_tqdm: bool | Callable[..., Any] = True,
        *,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One finished :class:`RequestOutput` per prompt, in prompt order, as vLLM's ``LLM.generate``: its
        ``outputs`` are the prompt's ``n`` choices (with a seed, choice j samples with seed + j; with ``best_of``
        > n, the n most likely of best_of, best first: ``cluster.engine.fanout``); its ``text``, ``token_ids``, ...
        are the first choice's. Prompts (strings, token-id lists, ``{"prompt": ...}``, ``{"prompt_token_ids":
        [...]}``) are batched continuously; ``use_tqdm`` shows a progress bar (or is the tqdm class to use).
        ``priority``: all 0 (the engine schedules first come, first served).

        A request that fails in a step raises its error (``ExpertWorkerError`` when a worker was lost).
        """
        return self._run(self._prompts(prompts), sampling_params, use_tqdm, priority)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: ParamsLike = None,
        use_tqdm: bool | Callable[..., Any] = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        documents: Sequence[Mapping[str, str]] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of OpenAI messages) or several (a list of them), rendered
        in the model's chat format exactly as the HTTP server renders them (with ``tools`` in the prompt), as
        vLLM's ``LLM.chat``. The output text is the model's raw reply (tool calls are not parsed here)."""
        if not messages:
            raise InvalidRequestError("no messages given", param="messages")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        options = ChatOptions(
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            documents=tuple(documents) if documents is not None else None,
            template_kwargs=chat_template_kwargs,
        )
        prompts = []
        for conversation in conversations:
            ids = self.tokenizer.encode_chat(conversation, tools=tools, options=options)  # type: ignore[arg-type]
            prompts.append(
                (self.tokenizer.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False), ids)
            )
        return self._run(prompts, sampling_params, use_tqdm, None)

    def _run(
        self,
        prompts: list[tuple[str | None, list[int]]],
        sampling_params: ParamsLike,
        use_tqdm: bool | Callable[..., Any],
        priority: Sequence[int] | None,
    ) -> list[RequestOutput]:
        if priority is not None and any(p != 0 for p in priority):
            raise InvalidRequestError(
                "priority: this engine schedules first come, first served; only priority 0 is accepted",
                param="priority",
            )
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        flat_ids = [ids for (_, ids), sp in zip(prompts, params, strict=True) for _ in range(sp.candidates)]
        flat_params = [c for sp in params for c in fanout.expand(sp)]
        owners = [k for k, sp in enumerate(params) for _ in range(sp.candidates)]
        progress = None
        if use_tqdm:
            progress = _Progress(owners, len(prompts), use_tqdm if callable(use_tqdm) else tqdm)
        try:
            outs = self._live().generate(flat_ids, flat_params, progress)
        finally:
            if progress is not None:
                progress.close()
        for o in outs:
            if o.error is not None:
                raise o.error
        results: list[RequestOutput] = []
        start = 0
        for (text, _), sp in zip(prompts, params, strict=True):
            chosen = fanout.chosen(outs[start : start + sp.candidates], sp)
            results.append(prompt_output(self.tokenizer, text, chosen))
            start += sp.candidates
        return results

    # ------------------------------------------------------------------ pooling (cluster.engine.pooling)
    def embed(
        self,
        prompts: PromptLike,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, as vLLM's ``LLM.embed``: the final hidden state pooled (``last`` by default,
        L2-normalized; ``pooling_params`` picks ``mean`` / ``cls`` or no normalizing)."""
        items = self._prompts(prompts)
        params = _task_params("embed", pooling_params, truncate_prompt_tokens)
        return [
            EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(v.tolist()), prompt=text)
            for (text, _), (o, v) in zip(items, self._pool([ids for _, ids in items], params, use_tqdm), strict=True)
        ]

    def classify(
        self,
        prompts: PromptLike,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Label probabilities per prompt from a ``MixtralForSequenceClassification`` checkpoint's score head, as
        vLLM's ``LLM.classify`` (the last token that is not padding; softmax, sigmoid for one label)."""
        items = self._prompts(prompts)
        params = _task_params("classify", pooling_params, truncate_prompt_tokens)
        labels = self.model_config.id2label  # one per score of the head
        return [
            ClassificationRequestOutput(
                o.request_id, o.prompt_token_ids, ClassificationOutput(v.tolist(), labels[int(v.argmax())]), prompt=text
            )
            for (text, _), (o, v) in zip(items, self._pool([ids for _, ids in items], params, use_tqdm), strict=True)
        ]

    def score(
        self,
        data_1: str | list[str],
        data_2: str | list[str],
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """How well each document (``data_2``) answers its query (``data_1``: one for all, or one each), as vLLM's
        ``LLM.score`` (``cluster.engine.scoring``)."""
        pairs = scoring.pairs(data_1, data_2)
        if scoring.score_mode(self.model_config.num_labels) == "cross_encoder":
            ids = [scoring.pair_prompt(self.tokenizer, q, d) for q, d in pairs]
            params = PoolingParams(task="classify", truncate_prompt_tokens=truncate_prompt_tokens)
            pooled = self._pool(ids, params, use_tqdm)
            scores = [float(v[0]) for _, v in pooled]
        else:
            texts = [t for pair in pairs for t in pair]
            params = PoolingParams(task="embed", truncate_prompt_tokens=truncate_prompt_tokens)
            pooled = self._pool([self.tokenizer.encode(t) for t in texts], params, use_tqdm)
            scores = [scoring.cosine(pooled[2 * i][1], pooled[2 * i + 1][1]) for i in range(len(pairs))]
            pooled = pooled[::2]  # each pair is reported as its query's request
        return [
            ScoringRequestOutput(o.request_id, o.prompt_token_ids, ScoringOutput(s))
            for (o, _), s in zip(pooled, scores, strict=True)
        ]

    def _pool(
        self, prompts: list[list[int]], params: PoolingParams, use_tqdm: bool | Callable[..., Any]
    ) -> list[tuple[RequestOutput, torch.Tensor]]:
        """Each prompt's finished output and its pooled vector, in order; a request that failed raises its error."""
        progress = None
        if use_tqdm:
            progress = _Progress(list(range(len(prompts))), len(prompts), use_tqdm if callable(use_tqdm) else tqdm)
        try:
            outs = self._live().generate(prompts, [params] * len(prompts), progress)
        finally:
            if progress is not None:
                progress.close()
        pooled = []
        for o in outs:
            if o.error is not None:
                raise o.error
            if o.pooled is None:
                raise InternalError(
                    f"request {o.request_id} finished without its pooled result", request_id=o.request_id
                )
            pooled.append((o, o.pooled))
        return pooled

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


def _task_params(task: PoolingTask, given: PoolingParams | None, truncate_prompt_tokens: int | None) -> PoolingParams:
    """``given`` (which must be for ``task``), else the task's defaults."""
    if given is None:
        return PoolingParams(task=task, truncate_prompt_tokens=truncate_prompt_tokens)
    if given.task != task:
        raise InvalidRequestError(f"{task} takes PoolingParams(task={task!r})", param="pooling_params")
    return given
