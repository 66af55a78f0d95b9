"""``score`` (vLLM's ``LLM.score`` and ``POST /score``): how well each document answers a query, with the model the
server has.

- A one-label classifier (a cross-encoder, ``MixtralForSequenceClassification`` with ``num_labels = 1``) reads the
  pair as one input, laid out as transformers' Llama tokenizers join a text pair (``<s> query <s> document``), and
  the score is the sigmoid of its one logit.
- A causal LM embeds query and document apart (last-token pooling, L2-normalized) and the score is their cosine
  similarity.
- A classifier of several labels has no score: asking is a 400 naming ``model``.
"""

from __future__ import annotations

from typing import Literal

import torch

from cluster.errors import InvalidRequestError
from cluster.text.tokenizer import Tokenizer

ScoreMode = Literal["cross_encoder", "embedding"]


def score_mode(num_labels: int) -> ScoreMode:
    """How a model of ``num_labels`` labels (0: a causal LM) scores pairs."""
    if num_labels == 0:
        return "embedding"
    if num_labels == 1:
        return "cross_encoder"
    raise InvalidRequestError(
        f"this classifier has {num_labels} labels; score needs a one-label classifier (a cross-encoder) or an "
        "embedding model",
        param="model",
    )


def pair_prompt(tokenizer: Tokenizer, query: str, document: str) -> list[int]:
    """``<s> query <s> document`` as token ids: ``encode(query) + encode(document)``, each with its own BOS."""
    return tokenizer.encode(query) + tokenizer.encode(document)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embeddings [D]."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def pairs(queries: str | list[str], documents: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one query against each document, or queries and documents one to one."""
    qs = [queries] if isinstance(queries, str) else list(queries)
    ds = [documents] if isinstance(documents, str) else list(documents)
    if not qs or not ds:
        raise InvalidRequestError(
            "score needs at least one query (text_1) and one document (text_2)", param="text_1" if not qs else "text_2"
        )
    if len(qs) == 1:
        return [(qs[0], d) for d in ds]
    if len(qs) != len(ds):
        raise InvalidRequestError(
            f"{len(qs)} queries (text_1) and {len(ds)} documents (text_2): give one query, or as many queries as "
            "documents",
            param="text_2",
        )
    return list(zip(qs, ds, strict=True))
