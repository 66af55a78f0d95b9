"""Embed, classify and score through the frontend: what ``/v1/embeddings``, ``/classify``, ``/score`` and the gRPC
methods Embed, Classify and Score share (they only format the results).

Each input (or score pair) is one engine request with :class:`~cluster.engine.pooling.PoolingParams`; they are
submitted at once (``asyncio.gather``), so the engine prefills them in the same steps, next to other requests'
decodes, and the results come back in input order. At most :data:`MAX_INPUTS` inputs per call (the fan-out limit
of ``n``). Score follows :mod:`cluster.engine.scoring`: a one-label classifier reads each pair as one input and the
score is its sigmoid; a causal LM embeds each distinct text once and the score is the cosine of the two embeddings.

Request problems are 400s naming the field: an empty input (or input list), more than :data:`MAX_INPUTS`, an input
longer than the context (``input``, after ``truncate_prompt_tokens``), ``dimensions`` other than the hidden size,
classify on a causal LM or score on a classifier of several labels (``model``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from cluster.engine import scoring
from cluster.engine.pooling import PoolingParams
from cluster.engine.sampling import MAX_CHOICES
from cluster.errors import InternalError, InvalidRequestError, PromptTooLongError
from cluster.serve.ingress.body import check_prompt_chars
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api.pooling_protocol import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingInput,
    ScoreRequest,
)
from cluster.serve.ingress.streams import Choice

MAX_INPUTS = MAX_CHOICES  # engine requests one call may fan out to (inputs, or score pairs)


@dataclass(frozen=True)
class ModelFacts:
    """What pooling requests are checked against, from the frontend's ``model_info()``."""

    max_model_len: int
    hidden_size: int
    id2label: tuple[str, ...]  # empty: a causal LM

    @classmethod
    def of(cls, info: dict[str, Any]) -> ModelFacts:
        return cls(int(info["max_model_len"]), int(info["hidden_size"]), tuple(info.get("id2label") or ()))

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


async def model_facts(ctx: ServeContext) -> ModelFacts:
    return ModelFacts.of(await ctx.frontend.model_info())


@dataclass
class Pooled:
    """Per input its vector (an embedding [D], or label scores [C]), and the tokens the inputs ran."""

    vectors: list[torch.Tensor]
    prompt_tokens: int


def input_items(value: PoolingInput, param: str = "input") -> list[str | list[int]]:
    """The items of an ``input``: a text or one list of ids is one item. A 400 naming ``param`` for no items, an
    empty one, or more than :data:`MAX_INPUTS`."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and all(isinstance(x, int) for x in value):
        items = [list(value)]
    else:
        items = list(value)
    if not items:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if len(items) > MAX_INPUTS:
        raise InvalidRequestError(f"{param} has {len(items)} items; at most {MAX_INPUTS} per request", param=param)
    for i, item in enumerate(items):
        if not item:
            raise InvalidRequestError(f"{param}.{i} is empty", param=param)
    return items


def truncation(k: int | None, context: int) -> int | None:
    """How many last tokens ``truncate_prompt_tokens`` keeps (None: all); a 400 unless -1 or in [1, context]."""
    if k is None:
        return None
    if k == -1:
        return context
    if not 1 <= k <= context:
        raise InvalidRequestError(
            f"truncate_prompt_tokens must be -1 or in [1, {context}] (the context length), got {k}",
            param="truncate_prompt_tokens",
        )
    return k


def fit(ids: list[int], keep: int | None, context: int, param: str) -> list[int]:
    """The ids truncated to their last ``keep``; a 400 naming ``param`` when they still do not fit the context."""
    if keep is not None:
        ids = ids[-keep:]
    if len(ids) > context:
        raise PromptTooLongError(
            f"this model's maximum context length is {context} tokens; the {param} has {len(ids)}", param=param
        )
    return ids


async def encode_inputs(
    ctx: ServeContext, req: EmbeddingRequest | ClassificationRequest, context: int
) -> list[list[int]]:
    keep = truncation(req.truncate_prompt_tokens, context)
    prompts = []
    for item in input_items(req.input):
        ids = await ctx.encode(item, param="input", bos=req.add_special_tokens) if isinstance(item, str) else item
        prompts.append(fit(ids, keep, context, "input"))
    return prompts


async def run_pooled(
    ctx: ServeContext, prompts: list[list[int]], params: PoolingParams, base_id: str, t0: float
) -> list[torch.Tensor]:
    """Every prompt as engine request ``<base_id>-<i>``, all submitted at once; their vectors in order. The first
    refusal (in input order) is raised and the accepted ones are cancelled."""
    ids = [f"{base_id}-{i}" for i in range(len(prompts))]
    submitted = await asyncio.gather(
        *(ctx.frontend.submit(p, params, rid) for p, rid in zip(prompts, ids, strict=True)), return_exceptions=True
    )
    choices = [
        Choice(i, prompts[i], ids[i], r[0], params, r[1])
        for i, r in enumerate(submitted)
        if not isinstance(r, BaseException)
    ]
    failed = [r for r in submitted if isinstance(r, BaseException)]
    if failed:
        for c in choices:
            c.stream.cancel()
        raise failed[0]
    pooled: dict[int, torch.Tensor] = {}
    async for c, out in ctx.frontend.merged(choices, t0):
        if out.finished and out.pooled is not None:
            pooled[c.index] = out.pooled
    missing = [ids[i] for i in range(len(prompts)) if i not in pooled]
    if missing:
        raise InternalError(f"request {missing[0]} finished without its pooled result", request_id=missing[0])
    return [pooled[i] for i in range(len(prompts))]


async def embed(ctx: ServeContext, req: EmbeddingRequest, request_id: str, t0: float) -> Pooled:
    facts = await model_facts(ctx)
    if req.dimensions is not None and req.dimensions != facts.hidden_size:
        raise InvalidRequestError(
            f"dimensions must be the model's hidden size, {facts.hidden_size} (it was not trained to shorten its "
            f"embeddings); got {req.dimensions}",
            param="dimensions",
        )
    prompts = await encode_inputs(ctx, req, facts.max_model_len)
    params = PoolingParams(task="embed", pooling=req.pooling, normalize=req.normalize)
    return Pooled(await run_pooled(ctx, prompts, params, request_id, t0), sum(map(len, prompts)))


async def classify(ctx: ServeContext, req: ClassificationRequest, request_id: str, t0: float) -> Pooled:
    """Label scores per input (see :func:`label_of` for the names)."""
    facts = await model_facts(ctx)
    if not facts.num_labels:
        raise InvalidRequestError(
            "this model has no classification head (it is a causal LM); classify needs a "
            "MixtralForSequenceClassification checkpoint",
            param="model",
        )
    prompts = await encode_inputs(ctx, req, facts.max_model_len)
    params = PoolingParams(task="classify", activation=req.activation)
    return Pooled(await run_pooled(ctx, prompts, params, request_id, t0), sum(map(len, prompts)))


def label_of(facts: ModelFacts, scores: torch.Tensor) -> str:
    """The most likely label's name (``LABEL_<i>`` if the checkpoint names fewer labels than it scores)."""
    best = int(scores.argmax())
    return facts.id2label[best] if best < facts.num_labels else f"LABEL_{best}"


async def score(ctx: ServeContext, req: ScoreRequest, request_id: str, t0: float) -> tuple[list[float], int]:
    """Per pair its score, and the tokens the model inputs ran."""
    facts = await model_facts(ctx)
    mode = scoring.score_mode(facts.num_labels)  # 400 naming model for a classifier of several labels
    pairs = scoring.pairs(req.text_1, req.text_2)
    if len(pairs) > MAX_INPUTS:
        raise InvalidRequestError(f"{len(pairs)} pairs; at most {MAX_INPUTS} per request", param="text_2")
    context = facts.max_model_len
    keep = truncation(req.truncate_prompt_tokens, context)
    if mode == "cross_encoder":
        prompts = []
        for q, d in pairs:
            check_prompt_chars(len(q) + len(d), context, "text_2")
            prompts.append(fit(await ctx.offload(scoring.pair_prompt, ctx.tokenizer, q, d), keep, context, "text_2"))
        vectors = await run_pooled(ctx, prompts, PoolingParams(task="classify"), request_id, t0)
        return [float(v[0]) for v in vectors], sum(map(len, prompts))
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each distinct text embedded once
    queries = {q for q, _ in pairs}
    prompts = []
    for t in texts:
        param = "text_1" if t in queries else "text_2"
        prompts.append(fit(await ctx.encode(t, param=param), keep, context, param))
    vectors = await run_pooled(ctx, prompts, PoolingParams(task="embed"), request_id, t0)
    at = {t: i for i, t in enumerate(texts)}
    return [scoring.cosine(vectors[at[q]], vectors[at[d]]) for q, d in pairs], sum(map(len, prompts))
