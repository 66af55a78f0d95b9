"""A Hugging Face ``tokenizer.json`` and its ``tokenizer_config.json``, used as transformers uses them.

For model folders without a Mistral tokenizer file (or whose chat template is not Mistral's ``[INST]`` format).
Text goes through the ``tokenizers`` library (the engine of transformers' fast tokenizers): ``encode`` is
``encode(text, add_special_tokens=False)``, ``decode`` skips special tokens. Chat renders the folder's chat template
(:mod:`cluster.text.chat_template`) and encodes the text exactly as ``apply_chat_template(..., tokenize=True)`` does,
special tokens written in the text (``<s>``, ``[INST]``, ...) included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from cluster.errors import ChatFormatError, SetupError
from cluster.text.chat_template import SPECIAL_TOKEN_KEYS, ChatOptions, ChatTemplate
from cluster.text.hf_config import CONFIG_FILE_NAME, TEMPLATE_FILE_NAME, chat_template_sources, read_config

__all__ = ["HFBackend"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _token_text(value: Any) -> str | None:
    """A special token of ``tokenizer_config.json``: a string or an ``AddedToken`` dict with ``content``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFBackend:
    """A ``tokenizer.json`` (``tokenizers`` library) with the chat template of its folder.

    Raises:
        SetupError: The file cannot be loaded, its config is broken, or it has no BOS/EOS token.
    """

    kind = "huggingface"
    version: str | None = None

    def __init__(self, path: Path) -> None:
        try:
            self._tk = HFTokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as err:  # tokenizers raises a plain Exception on malformed files
            raise SetupError(f"tokenizer {str(path)!r} is not a Hugging Face tokenizer.json: {err}") from err
        config = read_config(path.parent)
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        self.bos_id = self._token_id(path, "bos_token", "<s>")
        self.eos_id = self._token_id(path, "eos_token", "</s>")
        self.vocab_size = int(self._tk.get_vocab_size(with_added_tokens=True))
        self._special_ids = {i for i, token in self._tk.get_added_tokens_decoder().items() if token.special}
        model = spec.get("model") or {}
        self._byte_fallback = bool(model.get("byte_fallback"))
        # tokenizers' ByteFallback decoder turns each run of byte pieces into text at once: valid UTF-8, or one
        # U+FFFD per byte of the run, so a later byte can change the text of the earlier ones.
        self.atomic_byte_runs = self._byte_fallback
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}
        sources = chat_template_sources(path.parent, config)
        self.template = (
            ChatTemplate(sources, self.special_tokens, where=str(path.parent)) if sources is not None else None
        )

    def _token_id(self, path: Path, key: str, default: str) -> int:
        text = self.special_tokens.get(key, default)
        token_id = self._tk.token_to_id(text)
        if token_id is None:
            raise SetupError(f"{path}: the {key} {text!r} is not in the vocabulary (set it in {CONFIG_FILE_NAME})")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tk.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def byte_value(self, token_id: int) -> int | None:
        if not self._byte_fallback:
            return None
        match = _BYTE_PIECE.fullmatch(self.id_to_piece(token_id))
        return int(match.group(1), 16) if match else None

    def piece_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token adds; ``b""`` for special tokens, which ``decode`` drops before joining the bytes."""
        if token_id in self._special_ids:
            return b""
        value = self.byte_value(token_id)
        if value is not None:
            return bytes([value])
        piece = self.id_to_piece(token_id)
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        return piece.replace("\u2581", " ").encode()

    def special_id(self, piece: str) -> int | None:
        token_id = self._tk.token_to_id(piece)
        return token_id if token_id in self._special_ids else None

    def encode_chat(self, messages: Any, tools: Any, options: ChatOptions | None = None) -> list[int]:
        if self.template is None:
            raise ChatFormatError(
                f"this model has no chat template (no {TEMPLATE_FILE_NAME} and no chat_template in {CONFIG_FILE_NAME})"
            )
        return self.encode(self.template.render(messages, tools=tools, options=options))
