"""Structured output through llguidance: a request's :class:`~cluster.engine.sampling.StructuredOutput` becomes a
grammar matcher that says, at every step, which tokens may come next (the engine masks the rest).

Grammars: a JSON schema (llguidance's JSON compiler), any JSON object, a regular expression, a choice among
strings (an alternation of their escaped texts) or a Lark grammar. llguidance sees our vocabulary as the bytes
each token adds to the text (:meth:`Tokenizer.piece_bytes`); tokens that add none (control tokens) are special.
"""

from __future__ import annotations

import json
import re
import threading

import llguidance
import numpy as np
import torch

from cluster.engine.sampling import StructuredOutput
from cluster.errors import SamplingParamsError
from cluster.text.tokenizer import Tokenizer


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS, special ids and a tokenize call."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        pieces = [tokenizer.piece_bytes(i) if i < tokenizer.vocab_size else None for i in range(vocab_size)]
        # Tokens that add no text (control tokens, padding past the tokenizer's vocabulary) are special: llguidance
        # names them by a 0xFF byte and their piece.
        self.special_token_ids = [i for i, p in enumerate(pieces) if not p]
        self.tokens = [p if p else b"\xff" + self._name(tokenizer, i).encode() for i, p in enumerate(pieces)]
        self._by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            if piece:
                self._by_bytes.setdefault(piece, i)
        self._longest = max(map(len, self._by_bytes), default=1)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id

    @staticmethod
    def _name(tokenizer: Tokenizer, i: int) -> str:
        return tokenizer.id_to_piece(i) if i < tokenizer.vocab_size else f"<pad_{i}>"

    def __call__(self, text: str) -> list[int]:
        """Tokens whose bytes are exactly ``text``'s (llguidance needs that; the model's own encoder would add
        sentencepiece's leading space): greedy longest match, byte tokens for the rest."""
        data = text.encode("utf-8")
        out, i = [], 0
        while i < len(data):
            for j in range(min(len(data), i + self._longest), i, -1):
                t = self._by_bytes.get(data[i:j])
                if t is not None:
                    out.append(t)
                    i = j
                    break
            else:
                raise ValueError(f"no token for byte {data[i]:#04x}")
        return out


class GrammarMatcher:
    """One request's grammar state (``cluster.engine.sampling.TokenMatcher``)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self._v = vocab_size

    def allowed(self) -> torch.Tensor:
        words = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)  # little-endian 32-bit words
        return torch.from_numpy(np.unpackbits(words, bitorder="little")[: self._v].astype(bool))

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"the grammar matcher refused token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        return self._m.is_stopped()


class LLGuidanceGrammars:
    """``cluster.engine.sampling.GrammarCompiler`` over llguidance. The tokenizer view is built on first use (~1 s)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                wrapper = llguidance.TokenizerWrapper(_Vocabulary(self._tokenizer, self._vocab_size))
                self._lltok = llguidance.LLTokenizer(wrapper, n_vocab=self._vocab_size)
            return self._lltok

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        grammar = grammar_of(spec)
        lltok = self._ll_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise SamplingParamsError(param="response_format", message=f"invalid {spec.kind} grammar: {error}")
        return GrammarMatcher(llguidance.LLMatcher(lltok, grammar, log_level=0), self._vocab_size)


def grammar_of(spec: StructuredOutput) -> str:
    """The llguidance grammar of a structured-output request; SamplingParamsError for a malformed spec."""
    try:
        if spec.kind == "json_schema":
            schema = json.loads(spec.spec)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema is a JSON object")
            return _json_grammar(schema)
        if spec.kind == "json_object":
            return _json_grammar({"type": "object"})
        if spec.kind == "regex":
            re.compile(spec.spec)
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            choices = json.loads(spec.spec)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError("choices are a non-empty list of strings")
            return llguidance.LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in choices))
        return llguidance.LLMatcher.grammar_from_lark(spec.spec)
    except (ValueError, re.error) as e:
        raise SamplingParamsError(param="response_format", message=f"invalid {spec.kind}: {e}") from None


def _json_grammar(schema: dict) -> str:
    """JSON laid out like ``json.dumps``: no free whitespace, so a model cannot spend its tokens on blanks."""
    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    )
