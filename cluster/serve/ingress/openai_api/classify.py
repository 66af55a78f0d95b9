"""POST /classify and POST /score in vLLM's shapes (:mod:`cluster.serve.ingress.openai_api.pooling` runs them).

``/classify``: per input the label probabilities of a sequence classifier, the most likely label's name and the
number of labels. ``/score``: per (query, document) pair a score: the sigmoid of a one-label classifier over the
pair, or the cosine of the two embeddings of a causal LM (:mod:`cluster.engine.scoring`).
"""

from __future__ import annotations

import time

from fastapi.responses import Response

from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api import pooling
from cluster.serve.ingress.openai_api.pooling_protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    PoolingUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from cluster.serve.ingress.openai_api.responses import json_response

CLASSIFY = "classify"
SCORE = "score"


async def create_classification(ctx: ServeContext, req: ClassificationRequest, request_id: str, t0: float) -> Response:
    pooled = await pooling.classify(ctx, req, request_id, t0)
    facts = await pooling.model_facts(ctx)
    data = [
        ClassificationData(index=i, label=pooling.label_of(facts, v), probs=v.float().tolist(), num_classes=len(v))
        for i, v in enumerate(pooled.vectors)
    ]
    body = ClassificationResponse(
        id=request_id,
        created=int(time.time()),
        model=ctx.model_name,
        data=data,
        usage=PoolingUsage.of(pooled.prompt_tokens),
    )
    return json_response(body)


async def create_score(ctx: ServeContext, req: ScoreRequest, request_id: str, t0: float) -> Response:
    scores, tokens = await pooling.score(ctx, req, request_id, t0)
    data = [ScoreData(index=i, score=s) for i, s in enumerate(scores)]
    body = ScoreResponse(
        id=request_id, created=int(time.time()), model=ctx.model_name, data=data, usage=PoolingUsage.of(tokens)
    )
    return json_response(body)
