"""The offline API's pooling results in vLLM's shape: ``LLM.embed`` -> :class:`EmbeddingRequestOutput`
(``.outputs.embedding``), ``LLM.classify`` -> :class:`ClassificationRequestOutput` (``.outputs.probs``),
``LLM.score`` -> :class:`ScoringRequestOutput` (``.outputs.score``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass
class EmbeddingOutput:
    """The pooled hidden state (L2-normalized unless the request said otherwise)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    """Per label its probability (softmax over the labels; sigmoid for a one-label head), and the most likely
    label's name from the checkpoint's ``id2label``."""

    probs: list[float]
    label: str

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    """How well a document answers a query: a one-label classifier's sigmoid over the pair, or the cosine
    similarity of the two embeddings."""

    score: float


T = TypeVar("T", EmbeddingOutput, ClassificationOutput, ScoringOutput)


@dataclass
class PoolingRequestOutput(Generic[T]):
    """One input's result (vLLM's ``PoolingRequestOutput``): ``prompt`` is its text (None for token ids)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: T
    finished: bool = True
    prompt: str | None = None


EmbeddingRequestOutput = PoolingRequestOutput[EmbeddingOutput]
ClassificationRequestOutput = PoolingRequestOutput[ClassificationOutput]
ScoringRequestOutput = PoolingRequestOutput[ScoringOutput]
