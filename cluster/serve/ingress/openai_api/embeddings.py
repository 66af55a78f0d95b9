"""POST /v1/embeddings in OpenAI's shape: one embedding per input (:mod:`cluster.serve.ingress.openai_api.pooling`),
as float values or, with ``encoding_format: base64``, their little-endian float32 bytes in base64 (what the
``openai`` client asks for by default and decodes itself)."""

from __future__ import annotations

import base64
import time
from typing import Literal

import torch
from fastapi.responses import Response

from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api import pooling
from cluster.serve.ingress.openai_api.pooling_protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingUsage,
)
from cluster.serve.ingress.openai_api.responses import json_response

ENDPOINT = "embeddings"


def encoded(vector: torch.Tensor, encoding_format: Literal["float", "base64"]) -> list[float] | str:
    """The embedding as JSON floats, or base64 of its float32 values, little-endian."""
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.float().tolist()


async def create_embedding(ctx: ServeContext, req: EmbeddingRequest, request_id: str, t0: float) -> Response:
    pooled = await pooling.embed(ctx, req, request_id, t0)
    data = [EmbeddingData(index=i, embedding=encoded(v, req.encoding_format)) for i, v in enumerate(pooled.vectors)]
    body = EmbeddingResponse(
        id=request_id,
        created=int(time.time()),
        model=ctx.model_name,
        data=data,
        usage=PoolingUsage.of(pooled.prompt_tokens),
    )
    return json_response(body)
