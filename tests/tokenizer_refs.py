"""The tokenizers bundled with mistral-common, loaded once per test process (tekken takes seconds to load).

``mixserve(name)`` is mixserve's :class:`~cluster.text.tokenizer.Tokenizer` of a bundled file; ``reference(name)`` is
mistral-common's own ``MistralTokenizer`` of the same file, the independent reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from cluster.text.tokenizer import Tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240718.json",
}
_REFERENCES: dict[str, Callable[[], MistralTokenizer]] = {
    "v1": MistralTokenizer.v1,
    "v2": MistralTokenizer.v2,
    "v3": MistralTokenizer.v3,
    "v7": MistralTokenizer.v7,
    "tekken": lambda: MistralTokenizer.v3(is_tekken=True),
}


@functools.cache
def mixserve(name: str) -> Tokenizer:
    return Tokenizer(DATA / FILES[name])


@functools.cache
def reference(name: str) -> MistralTokenizer:
    return _REFERENCES[name]()
