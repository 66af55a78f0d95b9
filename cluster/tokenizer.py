"""SentencePiece tokenizer for Mixtral-architecture models.

Three pieces live here:

* :class:`Tokenizer` wraps a ``sentencepiece`` model (``tokenizer.model`` of a model folder, or the
  Mixtral-8x7B tokenizer bundled with ``mistral-common``) and offers plain ``encode``/``decode``.
* :meth:`Tokenizer.encode_chat` renders a conversation in the Mistral v1 instruct format, token for
  token as ``mistral_common``'s ``MistralTokenizer.v1()`` does it.
* :class:`IncrementalDetokenizer` turns a stream of generated ids into text deltas whose concatenation
  is exactly ``Tokenizer.decode`` of all the generated ids.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from cluster.errors import ChatFormatError

__all__ = [
    "ChatFormatError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "default_model_file",
]

#: File name of the sentencepiece model inside a model folder.
MODEL_FILE_NAME = "tokenizer.model"

_BUNDLED_PACKAGE = "mistral_common"
_BUNDLED_RESOURCE = ("data", "tokenizer.model.v1")

_ROLES = ("system", "user", "assistant")


def default_model_file() -> Path:
    """Return the Mixtral-8x7B tokenizer that ships inside the ``mistral-common`` package.

    The file is ``mistral_common/data/tokenizer.model.v1``; nothing is ever downloaded.

    Raises:
        FileNotFoundError: ``mistral-common`` is not installed or does not contain the file.
    """
    try:
        resource = importlib.resources.files(_BUNDLED_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"no {MODEL_FILE_NAME} given and the {_BUNDLED_PACKAGE!r} package holding the default one is not installed"
        ) from None
    for part in _BUNDLED_RESOURCE:
        resource = resource.joinpath(part)
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"the bundled tokenizer {path} does not exist")
    return path


class Tokenizer:
    """A sentencepiece tokenizer (BOS id 1, EOS id 2 for the Mixtral model).

    Args:
        model_file: Path of a sentencepiece ``.model`` file.

    Raises:
        FileNotFoundError: ``model_file`` is not a file.
    """

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
        self._path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self._bos_id = int(self._sp.bos_id())
        self._eos_id = int(self._sp.eos_id())

    @classmethod
    def from_dir(cls, path: str | Path | None, *, tokenizer: str | Path | None = None) -> Tokenizer:
        """Load ``<path>/tokenizer.model``, or the bundled Mixtral-8x7B tokenizer when there is none.

        Args:
            path: A model folder, or ``None`` for the bundled tokenizer.
            tokenizer: An override: a tokenizer file, or a folder holding ``tokenizer.model``.

        Raises:
            NotADirectoryError: ``path`` is given but is not a folder.
            FileNotFoundError: The bundled tokenizer is needed but cannot be found, or the override does not exist.
        """
        if tokenizer is not None:
            override = Path(tokenizer)
            override = override / MODEL_FILE_NAME if override.is_dir() else override
            if not override.is_file():
                raise FileNotFoundError(
                    f"tokenizer {str(tokenizer)!r} is neither a tokenizer file nor a folder with one"
                )
            return cls(override)
        if path is None:
            return cls(default_model_file())
        folder = Path(path)
        if not folder.is_dir():
            raise NotADirectoryError(f"tokenizer folder {str(folder)!r} is not a directory")
        candidate = folder / MODEL_FILE_NAME
        return cls(candidate if candidate.is_file() else default_model_file())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r}, vocab_size={self.vocab_size})"

    @property
    def path(self) -> Path:
        """The sentencepiece model file in use."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the vocabulary."""
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token ``<s>``."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token ``</s>``."""
        return self._eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Tokenize ``text``, optionally adding BOS in front and EOS at the end."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(text)
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids into text exactly as sentencepiece does.

        BOS, EOS and other control tokens are dropped, byte-fallback pieces are joined into UTF-8 (each
        invalid byte becomes U+FFFD) and the leading space of the first word is removed.

        Raises:
            IndexError: An id is outside the vocabulary.
        """
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """Return the vocabulary piece of ``token_id`` (e.g. ``"▁Hello"``, ``"<0x0A>"``, ``"</s>"``).

        Raises:
            IndexError: ``token_id`` is outside the vocabulary.
        """
        return self._sp.id_to_piece(int(token_id))

    def byte_value(self, token_id: int) -> int | None:
        """Return the byte of a byte-fallback piece such as ``<0xE4>``, or ``None`` for other pieces."""
        token_id = int(token_id)
        if not self._sp.is_byte(token_id):
            return None
        return int(self._sp.id_to_piece(token_id)[3:-1], 16)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Render a conversation in the Mistral/Mixtral v1 instruct format.

        The result is ``<s>[INST] user1 [/INST] assistant1</s>[INST] user2 [/INST]``, identical to
        ``MistralTokenizer.v1().encode_chat_completion(...).tokens`` from ``mistral-common``: every user turn
        is tokenized on its own as ``"[INST] {content} [/INST]"``, every assistant turn on its own followed
        by EOS, and an optional leading system message is put in front of the *first* user message,
        separated by a blank line (``"{system}\\n\\n{user}"``). An empty system prompt is ignored.

        Args:
            messages: ``{"role": ..., "content": ...}`` mappings; roles are ``"system"`` (only as the
                first message), then alternating ``"user"`` and ``"assistant"``, starting and ending with
                ``"user"``. Other keys are ignored.

        Raises:
            ChatFormatError: The conversation does not follow that structure, a role is unknown, a
                content is not a string, or an assistant message is empty.
        """
        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise ChatFormatError(f"messages must be a list of messages, got {type(messages).__name__}")
        if not messages:
            raise ChatFormatError("messages is empty: the conversation needs at least one user message")

        system_prompt = ""
        ids = [self._bos_id]
        expected = "user"
        first_user = True
        for index, message in enumerate(messages):
            role, content = _role_and_content(index, message)
            if role == "system":
                if index != 0:
                    raise ChatFormatError(f"message {index}: a system message is only allowed as the first message")
                system_prompt = content
                continue
            if role != expected:
                raise ChatFormatError(
                    f"message {index}: expected role {expected!r} but got {role!r} "
                    "(after an optional system message, user and assistant messages must alternate, "
                    "starting with user)"
                )
            if role == "user":
                if first_user and system_prompt:
                    content = f"{system_prompt}\n\n{content}"
                first_user = False
                ids.extend(self._sp.encode(f"[INST] {content} [/INST]"))
                expected = "assistant"
            else:
                if not content:
                    raise ChatFormatError(f"message {index}: assistant message has empty content")
                ids.extend(self._sp.encode(content))
                ids.append(self._eos_id)
                expected = "user"
        if first_user:
            raise ChatFormatError("the conversation has no user message")
        if expected == "user":
            raise ChatFormatError(
                f"message {len(messages) - 1}: the conversation must end with a user message, not an assistant message"
            )
        return ids


def _role_and_content(index: int, message: Any) -> tuple[str, str]:
    """Validate one chat message and return its role and content."""
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"message {index}: expected a mapping with 'role' and 'content'")
    role = message.get("role")
    if role not in _ROLES:
        raise ChatFormatError(f"message {index}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
    content = message.get("content")
    if not isinstance(content, str):
        raise ChatFormatError(f"message {index}: content must be a string, got {type(content).__name__}")
    return role, content


def _utf8_length(lead: int) -> int:
    """Bytes needed by a UTF-8 sequence starting with ``lead`` (1 for bytes that cannot start one).

    Sentencepiece's byte decoding knows sequences of at most 4 bytes; this errs on the long side
    (e.g. 0xC0 or 0xF5, always invalid) which only delays output, never changes it.
    """
    if 0xC0 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF7:
        return 4
    return 1


class IncrementalDetokenizer:
    """Turn generated token ids into streamed text.

    ``"".join(add(t) for t in ids) + flush()`` equals ``tokenizer.decode(ids)`` exactly, including the
    removal of the leading space of the first word, control tokens anywhere, multi-byte characters made
    of byte-fallback pieces, and invalid UTF-8 (one U+FFFD per invalid byte, as ``decode``).

    A delta never contains text that a later token could still change: characters whose bytes may not
    all have arrived are held back (at most three byte pieces) until they are complete or ``flush``.

    Per token only a short window of ids is decoded: ``[prefix_offset, read_offset)`` are the ids that
    produced the previous delta and ``[read_offset, end)`` the new ones. Decoding both from the same start
    makes sentencepiece's leading-space removal and byte grouping identical to decoding everything.

    Args:
        tokenizer: The tokenizer whose ids are streamed.
        prompt_ids: The prompt's ids, kept as :attr:`prompt_ids` for reference. They are not part of the
            output: the text is that of the generated ids alone, as ``decode(token_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self.prompt_ids: list[int] = [int(i) for i in prompt_ids] if prompt_ids is not None else []
        self._ids: list[int] = []
        self._parts: list[str] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_len: int | None = 0  # len(decode(ids[prefix_offset:read_offset])); None = unknown
        self._finished = False

    @property
    def token_ids(self) -> list[int]:
        """The generated ids added so far (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text returned so far by :meth:`add` and :meth:`flush`."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token_id: int) -> str:
        """Append one generated id and return the text it completes (possibly ``""``).

        Raises:
            IndexError: ``token_id`` is outside the vocabulary.
            RuntimeError: :meth:`flush` was already called.
        """
        if self._finished:
            raise RuntimeError("add() called after flush()")
        token_id = int(token_id)
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self._tokenizer.vocab_size})")
        self._ids.append(token_id)
        return self._emit(self._stable_end())

    def flush(self) -> str:
        """Return the text still held back; call once when generation ends.

        Incomplete UTF-8 sequences at the end come out as U+FFFD, exactly as ``decode`` renders them.
        """
        if self._finished:
            return ""
        self._finished = True
        return self._emit(len(self._ids))

    def _stable_end(self) -> int:
        """Return ``end`` such that the text of ``ids[:end]`` can no longer change.

        Only an unfinished UTF-8 sequence at the very end (a lead byte followed by fewer continuation
        bytes than it announces, hence within the last three ids) can still change.
        """
        ids = self._ids
        end = len(ids)
        # read_offset is a character boundary, so a sequence starting before it is already complete.
        for i in range(end - 1, max(end - 4, self._read_offset - 1), -1):
            byte = self._tokenizer.byte_value(ids[i])
            if byte is None:
                return end
            if 0x80 <= byte <= 0xBF:  # continuation byte: look further back for its lead byte
                continue
            return i if end - i < _utf8_length(byte) else end
        return end

    def _emit(self, end: int) -> str:
        """Emit the text of ``ids[read_offset:end]`` and move the window when it is not empty."""
        if end <= self._read_offset:
            return ""
        decode = self._tokenizer.decode
        if self._prefix_len is None:
            self._prefix_len = len(decode(self._ids[self._prefix_offset : self._read_offset]))
        new_text = decode(self._ids[self._prefix_offset : end])
        if len(new_text) <= self._prefix_len:
            # Nothing visible yet (control tokens, or the leading "▁" that decode drops): keep the window
            # so that what follows gets the same leading-space handling as in the full decode.
            return ""
        delta = new_text[self._prefix_len :]
        self._prefix_offset, self._read_offset = self._read_offset, end
        self._prefix_len = None
        self._parts.append(delta)
        return delta
