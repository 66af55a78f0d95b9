"""The pooling request and response bodies: OpenAI's ``POST /v1/embeddings`` (with vLLM's extras), vLLM's
``POST /classify`` and ``POST /score``. Strict like the other bodies: an undeclared field is a 400 naming it.

``input`` is one text, a list of texts, one list of token ids or a list of them; each item is one engine request
(:mod:`cluster.serve.ingress.openai_api.pooling` runs them). Texts get a BOS in front unless
``add_special_tokens`` is false; token ids are used as given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt

from cluster.engine.pooling import PoolingType
from cluster.serve.ingress.openai_api.extras import Strict

PoolingInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class _Inputs(Strict):
    model: str | None = None
    input: PoolingInput = Field(description="a text, texts, token ids, or lists of token ids (at most 128 items)")
    truncate_prompt_tokens: StrictInt | None = Field(
        None, description="vLLM's: keep the last k tokens of each input (-1: the context length)"
    )
    add_special_tokens: StrictBool = Field(True, description="vLLM's: a BOS in front of each text")
    user: str | None = Field(None, description="accepted, no effect")


class EmbeddingRequest(_Inputs):
    """OpenAI's embeddings body; ``truncate_prompt_tokens``, ``normalize``, ``add_special_tokens`` are vLLM's,
    ``pooling`` mixserve's."""

    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the float32 values as little-endian bytes, base64-encoded"
    )
    dimensions: StrictInt | None = Field(None, description="only the model's hidden size (no Matryoshka training)")
    normalize: StrictBool = Field(True, description="L2-normalize each embedding")
    pooling: PoolingType = Field("last", description="the last token's hidden state, the mean of all, or the first's")


class ClassificationRequest(_Inputs):
    """vLLM's classify body (a sequence classifier checkpoint only)."""

    activation: StrictBool = Field(True, description="softmax over the labels (sigmoid for one); false: raw logits")


class ScoreRequest(Strict):
    """vLLM's score body: one query (``text_1``) for every document (``text_2``), or one query per document."""

    model: str | None = None
    text_1: str | list[str] = Field(description="the query, or one query per document")
    text_2: str | list[str] = Field(description="the document(s)")
    truncate_prompt_tokens: StrictInt | None = Field(
        None, description="keep the last k tokens of each model input (-1: the context length)"
    )
    user: str | None = Field(None, description="accepted, no effect")


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int) -> PoolingUsage:
        return cls(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="the values, or (encoding_format base64) their float32 bytes")


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage


class ClassificationData(BaseModel):
    index: int
    label: str = Field(description="the most likely label's name (the checkpoint's id2label)")
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage
