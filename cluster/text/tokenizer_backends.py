"""The vocabularies behind :class:`cluster.text.tokenizer.Tokenizer` that ``mistral-common`` loads.

* :class:`SentencePieceBackend`: a sentencepiece ``.model`` (Mistral v1, v2, v3, v7). Text goes through
  ``sentencepiece`` itself, chat through ``mistral-common``'s instruct tokenizer of the file's version.
* :class:`TekkenBackend`: a tekken ``.json`` (tiktoken-style byte-level BPE, Mistral-Nemo and later).

The version comes from ``mistral-common``'s own detection (``MistralTokenizer.from_file``: the ``.model.vN`` suffix,
the tekken file's config) except for an unversioned ``tokenizer.model``, which ``mistral-common`` takes for v1 even
when it holds the ``[INST]`` control tokens of v3 (Mixtral-8x22B's Hugging Face folder ships it so). There the
control tokens decide: none is v1, ``[SYSTEM_PROMPT]`` is v7, else v3.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV1,
    InstructTokenizerV2,
    InstructTokenizerV3,
    InstructTokenizerV7,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer, get_spm_version
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from cluster.errors import SetupError
from cluster.text.chat_format import encode_mistral_chat
from cluster.text.chat_template import ChatOptions

__all__ = ["Backend", "SentencePieceBackend", "TekkenBackend", "infer_spm_version"]

logger = logging.getLogger("mixserve")

_INSTRUCT = {"v1": InstructTokenizerV1, "v2": InstructTokenizerV2, "v3": InstructTokenizerV3, "v7": InstructTokenizerV7}
# Members spelled by value: mistral-common's enums derive from enum.StrEnum, which pyright's Python 3.10 lacks.
_TEST_MODE = ValidationMode("test")  # the mode of MistralTokenizer.v1() ... v7(), the references


class Backend(Protocol):
    """What :class:`cluster.text.tokenizer.Tokenizer` needs from a vocabulary."""

    kind: str  # "sentencepiece", "tekken" or "huggingface"
    version: str | None  # mistral-common's tokenizer version ("v1", "v3", ...); None without one
    vocab_size: int
    bos_id: int
    eos_id: int
    atomic_byte_runs: bool  # decode turns a run of byte pieces into text as a whole (see Tokenizer)

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def byte_value(self, token_id: int) -> int | None: ...
    def piece_bytes(self, token_id: int) -> bytes | None: ...
    def special_id(self, piece: str) -> int | None: ...
    def encode_chat(self, messages: Any, tools: Any, options: ChatOptions | None = None) -> list[int]: ...


def infer_spm_version(sp: spm.SentencePieceProcessor) -> TokenizerVersion:
    """The instruct version of an unversioned sentencepiece model, from its control tokens."""

    def is_control(piece: str) -> bool:
        token_id = sp.piece_to_id(piece)
        return token_id != sp.unk_id() and bool(sp.is_control(token_id))

    if not is_control("[INST]"):
        return TokenizerVersion("v1")
    return TokenizerVersion("v7" if is_control("[SYSTEM_PROMPT]") else "v3")


def _versioned(path: Path) -> bool:
    """Whether the file name carries a version ``mistral-common`` reads (``tokenizer.model.v3``, ``...v7m1``)."""
    if path.name.endswith(".model"):
        return False
    try:
        get_spm_version(path)
    except Exception:  # mistral-common raises its TokenizerException, or ValueError for unknown suffixes
        return False
    return True


class SentencePieceBackend:
    """A sentencepiece model: text via ``sentencepiece``, chat via ``mistral-common`` for the file's version."""

    kind = "sentencepiece"
    atomic_byte_runs = False

    def __init__(self, path: Path) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise SetupError(f"tokenizer {str(path)!r} is not a sentencepiece model: {err}") from err
        if _versioned(path):
            self.mistral = MistralTokenizer.from_file(str(path))
        else:
            version = infer_spm_version(self._sp)
            if version.value != "v1":
                logger.info("tokenizer %s has no version suffix; its control tokens say %s", path, version.value)
            raw = SentencePieceTokenizer(str(path), tokenizer_version=version)
            self.mistral = MistralTokenizer(
                _INSTRUCT[version.value](raw),
                validator=get_validator(version, mode=_TEST_MODE),
                request_normalizer=get_normalizer(version, None),
            )
        self.version: str | None = self.mistral.instruct_tokenizer.tokenizer.version.value
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def byte_value(self, token_id: int) -> int | None:
        if not self._sp.is_byte(token_id):
            return None
        return int(self._sp.id_to_piece(token_id)[3:-1], 16)

    def piece_bytes(self, token_id: int) -> bytes | None:
        """The bytes a piece adds to the text; ``None`` for control and unknown pieces, which split byte runs."""
        value = self.byte_value(token_id)
        if value is not None:
            return bytes([value])
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return None
        return self._sp.id_to_piece(token_id).replace("\u2581", " ").encode()

    def special_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return token_id if token_id != self._sp.unk_id() and self._sp.is_control(token_id) else None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Any, options: ChatOptions | None = None
    ) -> list[int]:
        return encode_mistral_chat(self.mistral, messages, tools, options)


class TekkenBackend:
    """A tekken tokenizer (``tekken.json``), loaded and encoded by ``mistral-common``."""

    kind = "tekken"
    atomic_byte_runs = False

    def __init__(self, path: Path) -> None:
        try:
            self.mistral = MistralTokenizer.from_file(str(path))
        except Exception as err:  # mistral-common raises its own, ValueError, KeyError or AssertionError on bad files
            raise SetupError(f"tokenizer {str(path)!r} is not a tekken tokenizer: {err}") from err
        tekken = self.mistral.instruct_tokenizer.tokenizer
        if not isinstance(tekken, Tekkenizer):
            raise SetupError(f"tokenizer {str(path)!r} is not a tekken tokenizer")
        self._tk = tekken
        self.version: str | None = tekken.version.value
        self.vocab_size = int(tekken.n_words)
        self.bos_id = int(tekken.bos_id)
        self.eos_id = int(tekken.eos_id)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, bos=False, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids)  # the default policy drops special tokens

    def id_to_piece(self, token_id: int) -> str:
        return self._tk.id_to_piece(token_id)

    def byte_value(self, token_id: int) -> int | None:
        return token_id - self._tk.num_special_tokens if self._tk.is_byte(token_id) else None

    def piece_bytes(self, token_id: int) -> bytes | None:
        """The bytes of a token; ``None`` for special tokens, which split byte runs in ``decode``."""
        if token_id < self._tk.num_special_tokens:
            return None
        return self._tk.id_to_byte_piece(token_id)

    def special_id(self, piece: str) -> int | None:
        return self._tk.get_special_token(piece) if self._tk.is_special(piece) else None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Any, options: ChatOptions | None = None
    ) -> list[int]:
        return encode_mistral_chat(self.mistral, messages, tools, options)
