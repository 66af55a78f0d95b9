"""Streaming detokenization: generated ids in, text deltas out, exactly as ``Tokenizer.decode`` would write them."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations
    from cluster.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]


def _utf8_length(lead: int) -> int:
    """Bytes needed by a UTF-8 sequence starting with ``lead`` (1 for bytes that cannot start one).

    UTF-8 decoders know sequences of at most 4 bytes; this errs on the long side (e.g. 0xC0 or 0xF5, always
    invalid) which only delays output, never changes it.
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
    removal of the leading space of the first word (sentencepiece), control tokens anywhere, multi-byte
    characters made of byte-fallback pieces or byte-level tokens (tekken), and invalid UTF-8 (rendered as
    ``decode`` renders it).

    A delta never contains text that a later token could still change: characters whose bytes may not
    all have arrived are held back (at most three bytes) until they are complete or ``flush``; for a
    tokenizer that decodes runs of byte pieces as a whole (``Tokenizer.atomic_byte_runs``, Hugging Face's
    ByteFallback) the trailing run of byte pieces is held back until another token ends it.

    Per token only a short window of ids is decoded: ``[prefix_offset, read_offset)`` are the ids that
    produced the previous delta and ``[read_offset, end)`` the new ones. Decoding both from the same start
    makes sentencepiece's leading-space removal and byte grouping identical to decoding everything.

    Args:
        tokenizer: The tokenizer whose ids are streamed.
        prompt_ids: The prompt's ids, kept as :attr:`prompt_ids` for reference. They are not part of the
            output: the text is that of the generated ids alone, as ``decode(token_ids)``.
        skip_special_tokens, spaces_between_special_tokens: as ``Tokenizer.decode`` takes them (vLLM's
            sampling parameters): the text is ``decode(token_ids, skip_special_tokens=...,
            spaces_between_special_tokens=...)``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Iterable[int] | None = None,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        # decode's keyword arguments, only when special tokens are kept (the default decode is the plain call)
        self._decode_options = (
            {}
            if skip_special_tokens
            else {"skip_special_tokens": False, "spaces_between_special_tokens": spaces_between_special_tokens}
        )
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

        Only an unfinished UTF-8 sequence at the very end (a lead byte followed by fewer continuation bytes than
        it announces, hence within the last three bytes) can still change. The bytes are the tokens'
        ``piece_bytes``; a token that splits byte runs (``None``) ends the search, and so does ``read_offset``,
        which is a character boundary (a sequence starting before it is already complete). A tokenizer that
        decodes byte runs as a whole (``atomic_byte_runs``) holds back the whole run of byte pieces at the end.
        """
        tokenizer, ids = self._tokenizer, self._ids
        end = len(ids)
        if tokenizer.atomic_byte_runs:
            start = end
            while start > self._read_offset and (
                tokenizer.byte_value(ids[start - 1]) is not None or tokenizer.piece_bytes(ids[start - 1]) == b""
            ):
                start -= 1
            while start < end and tokenizer.byte_value(ids[start]) is None:  # skipped tokens before the run
                start += 1
            return start
        tail = b""
        owners: list[int] = []  # the index in ids of each byte of tail
        i = end
        while i > self._read_offset and len(tail) < 3:
            piece = tokenizer.piece_bytes(ids[i - 1])
            if piece is None:
                break
            i -= 1
            tail = piece + tail
            owners[:0] = [i] * len(piece)
        for k in range(len(tail) - 1, max(len(tail) - 4, -1), -1):
            byte = tail[k]
            if 0x80 <= byte <= 0xBF:  # continuation byte: look further back for its lead byte
                continue
            return owners[k] if len(tail) - k < _utf8_length(byte) else end
        return end

    def _emit(self, end: int) -> str:
        """Emit the text of ``ids[read_offset:end]`` and move the window when it is not empty."""
        if end <= self._read_offset:
            return ""
        decode = functools.partial(self._tokenizer.decode, **self._decode_options)
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
