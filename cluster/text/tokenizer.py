"""The tokenizer of a model folder: every Mistral tokenizer through ``mistral-common``, else a Hugging Face one.

Three pieces live here:

* :class:`Tokenizer` loads the tokenizer of a checkpoint folder (:func:`find_tokenizer_file` says which file wins)
  and offers ``encode``/``decode`` and the piece-level queries the engine and the serving layer use.
* :meth:`Tokenizer.encode_chat` renders OpenAI-shaped messages (and tools) in the model's chat format: token for
  token as ``mistral-common``'s ``MistralTokenizer.encode_chat_completion`` for a Mistral tokenizer of any version
  (:mod:`cluster.text.chat_format`), or as transformers' ``apply_chat_template`` for a Hugging Face chat template
  (:mod:`cluster.text.chat_template`, :mod:`cluster.text.hf_tokenizer`).
* :class:`~cluster.text.detokenizer.IncrementalDetokenizer` (its own module) turns a stream of generated ids into
  text deltas whose concatenation is exactly ``Tokenizer.decode`` of all the generated ids.

Which file of a folder is the tokenizer (the first that exists):

1. ``tekken.json``, then a versioned sentencepiece model (``tokenizer.model.v3``, ``...v7``; the highest version
   when there are several), then any other ``*tekken*.json``: loaded by ``MistralTokenizer.from_file``.
2. ``tokenizer.model``: sentencepiece, version from its control tokens (see :mod:`cluster.text.tokenizer_backends`),
   unless the folder also has a ``tokenizer.json`` whose chat template is not Mistral's ``[INST]`` format (a fine-tune
   with its own format, e.g. ChatML): then that ``tokenizer.json`` and its template (without a ``tokenizer.json`` such a
   template cannot be rendered exactly; a warning says the Mistral format is used).
3. ``tokenizer.json`` (Hugging Face), with the chat template of ``tokenizer_config.json`` / ``chat_template.jinja``.
4. Nothing: Mixtral-8x7B's tokenizer bundled with ``mistral-common`` (``tokenizer.model.v1``), with a log line.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.sentencepiece import get_spm_version, is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import is_tekken

from cluster.errors import ChatFormatError
from cluster.text.chat_template import ChatOptions
from cluster.text.hf_config import mistral_format
from cluster.text.tokenizer_backends import Backend, SentencePieceBackend, TekkenBackend

__all__ = [
    "ChatFormatError",
    "ChatOptions",
    "Tokenizer",
    "default_model_file",
    "find_tokenizer_file",
]

logger = logging.getLogger("mixserve")

#: File name of the sentencepiece model inside a model folder.
MODEL_FILE_NAME = "tokenizer.model"
TEKKEN_FILE_NAME = "tekken.json"
HF_FILE_NAME = "tokenizer.json"

_BUNDLED_PACKAGE = "mistral_common"
_BUNDLED_RESOURCE = ("data", "tokenizer.model.v1")
_VERSION_ORDER = list(TokenizerVersion.__members__)  # "v1", "v2", ... in release order


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


def _versioned_models(folder: Path) -> list[Path]:
    """The folder's ``*.model.vN`` files (sentencepiece with a version ``mistral-common`` reads), lowest first."""
    found = []
    for path in folder.glob("*.model.v*"):
        if not is_sentencepiece(path):
            continue
        try:
            found.append((_VERSION_ORDER.index(get_spm_version(path).value), path.name, path))
        except Exception:  # mistral-common's TokenizerException for a suffix it does not know
            continue
    return [path for *_, path in sorted(found)]


def find_tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file of a model folder by the order in the module docstring, or ``None``."""
    if (folder / TEKKEN_FILE_NAME).is_file():
        return folder / TEKKEN_FILE_NAME
    versioned = _versioned_models(folder)
    if versioned:
        if len(versioned) > 1:
            logger.info("%s has several tokenizers %s: using %s", folder, [p.name for p in versioned], versioned[-1])
        return versioned[-1]
    tekkens = sorted(p for p in folder.glob("*tekken*.json") if is_tekken(p))
    if tekkens:
        return tekkens[-1]
    if (folder / MODEL_FILE_NAME).is_file():
        if mistral_format(folder) is False:
            if (folder / HF_FILE_NAME).is_file():
                logger.info("%s: its chat template is not Mistral's; using %s and that template", folder, HF_FILE_NAME)
                return folder / HF_FILE_NAME
            logger.warning(
                "%s: its chat template is not Mistral's, but without a %s it cannot be rendered; "
                "chat uses the Mistral format of %s",
                folder,
                HF_FILE_NAME,
                MODEL_FILE_NAME,
            )
        return folder / MODEL_FILE_NAME
    if (folder / HF_FILE_NAME).is_file():
        return folder / HF_FILE_NAME
    return None


def _load_backend(path: Path) -> Backend:
    if is_tekken(path):
        return TekkenBackend(path)
    if path.suffix == ".json":
        # Optional: tokenizers and jinja2 are only needed for Hugging Face tokenizer folders.
        from cluster.text.hf_tokenizer import HFBackend

        return HFBackend(path)
    return SentencePieceBackend(path)


class Tokenizer:
    """The tokenizer of a model (Mixtral-8x7B's: 32000 pieces, BOS id 1, EOS id 2).

    Args:
        model_file: A tokenizer file: a sentencepiece model (``tokenizer.model``, ``tokenizer.model.v3``, ...), a
            tekken ``.json``, or a Hugging Face ``tokenizer.json`` (its folder's ``tokenizer_config.json`` is read).

    Raises:
        FileNotFoundError: ``model_file`` is not a file.
        SetupError: The file is not a tokenizer of those kinds.
    """

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
        self._path = path
        self._backend = _load_backend(path)
        self._bos_id = self._backend.bos_id
        self._eos_id = self._backend.eos_id

    @classmethod
    def from_dir(cls, path: str | Path | None, *, tokenizer: str | Path | None = None) -> Tokenizer:
        """Load the tokenizer of a model folder (see :func:`find_tokenizer_file`), or the bundled one when it has none.

        Args:
            path: A model folder, or ``None`` for the bundled tokenizer.
            tokenizer: An override: a tokenizer file, or a folder holding one.

        Raises:
            NotADirectoryError: ``path`` is given but is not a folder.
            FileNotFoundError: The bundled tokenizer is needed but cannot be found, or the override does not exist.
        """
        if tokenizer is not None:
            override = Path(tokenizer)
            found = find_tokenizer_file(override) if override.is_dir() else override
            if found is None or not found.is_file():
                raise FileNotFoundError(
                    f"tokenizer {str(tokenizer)!r} is neither a tokenizer file nor a folder with one"
                )
            return cls(found)
        if path is None:
            logger.info("no model folder: using the bundled Mixtral-8x7B tokenizer %s", default_model_file())
            return cls(default_model_file())
        folder = Path(path)
        if not folder.is_dir():
            raise NotADirectoryError(f"tokenizer folder {str(folder)!r} is not a directory")
        found = find_tokenizer_file(folder)
        if found is None:
            logger.warning(
                "%s has no tokenizer (%s, %s, %s): using the bundled Mixtral-8x7B tokenizer %s",
                folder,
                MODEL_FILE_NAME,
                TEKKEN_FILE_NAME,
                HF_FILE_NAME,
                default_model_file(),
            )
            return cls(default_model_file())
        return cls(found)

    def __repr__(self) -> str:
        name, path = type(self).__name__, str(self._path)
        return f"{name}({path!r}, kind={self.kind}, version={self.version}, vocab_size={self.vocab_size})"

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[Path]]:
        # Rebuilt from its file (the kind and version are read from the file again), e.g. when sent to a Ray actor.
        return (type(self), (self._path,))

    @property
    def path(self) -> Path:
        """The tokenizer file in use."""
        return self._path

    @property
    def kind(self) -> str:
        """``"sentencepiece"``, ``"tekken"`` or ``"huggingface"``."""
        return self._backend.kind

    @property
    def version(self) -> str | None:
        """The Mistral tokenizer version (``"v1"``, ``"v3"``, ``"v7"``, ...); ``None`` for a Hugging Face tokenizer."""
        return self._backend.version

    @property
    def atomic_byte_runs(self) -> bool:
        """Whether ``decode`` turns a run of byte pieces into text as a whole (Hugging Face's ByteFallback: valid
        UTF-8, else one U+FFFD per byte), rather than character by character (sentencepiece, tekken)."""
        return self._backend.atomic_byte_runs

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return self._backend.vocab_size

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
        ids = self._backend.encode(text)
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def decode(
        self, ids: Iterable[int], *, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str:
        """Turn ids into text exactly as the tokenizer's own decoder does.

        Control tokens are dropped and byte pieces joined into UTF-8 (invalid bytes become U+FFFD). Sentencepiece
        also removes the leading space of the first word. With ``skip_special_tokens=False`` the special tokens are
        kept as their pieces (``</s>``, ``[INST]``) and the text between them decoded run by run, joined with a
        space when ``spaces_between_special_tokens`` (vLLM's and transformers' slow tokenizers' rule).

        Raises:
            IndexError: An id is outside the vocabulary.
        """
        ids = [int(i) for i in ids]
        size = self._backend.vocab_size
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise IndexError(f"token id {bad} is outside the vocabulary (size {size})")
        if skip_special_tokens:
            return self._backend.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if self.is_special(i):
                if run:
                    parts.append(self._backend.decode(run))
                    run = []
                parts.append(self._backend.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._backend.decode(run))
        return (" " if spaces_between_special_tokens else "").join(parts)

    def is_special(self, token_id: int) -> bool:
        """Whether ``decode`` drops the token: a control token (sentencepiece, tekken) or a Hugging Face special
        token."""
        return not self._backend.piece_bytes(self._checked(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, as OpenAI's logprobs report them: what it adds to decoded text (a
        byte-fallback piece ``<0x0A>`` is ``b"\\n"``), or a special token's piece."""
        data = self._backend.piece_bytes(self._checked(token_id))
        return data if data else self._backend.id_to_piece(token_id).encode()

    def token_text(self, token_id: int) -> str:
        """A token's own text as logprobs report it: :meth:`token_bytes` as UTF-8 (a lone byte of a longer
        character is U+FFFD, as vLLM shows it)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        """Return the vocabulary piece of ``token_id`` (e.g. ``"▁Hello"``, ``"<0x0A>"``, ``"</s>"``).

        Raises:
            IndexError: ``token_id`` is outside the vocabulary.
        """
        return self._backend.id_to_piece(self._checked(token_id))

    def byte_value(self, token_id: int) -> int | None:
        """Return the byte of a byte piece such as ``<0xE4>``, or ``None`` for other pieces."""
        return self._backend.byte_value(self._checked(token_id))

    def piece_bytes(self, token_id: int) -> bytes | None:
        """The UTF-8 bytes ``token_id`` adds to decoded text (``b""`` for none); ``None`` for a token that
        ``decode`` drops and that splits byte runs (sentencepiece control tokens, tekken special tokens)."""
        return self._backend.piece_bytes(self._checked(token_id))

    def special_id(self, piece: str) -> int | None:
        """The id of a control/special token such as ``"[TOOL_CALLS]"``, or ``None`` if this vocabulary has none."""
        return self._backend.special_id(piece)

    def _checked(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self._backend.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self._backend.vocab_size})")
        return token_id

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        options: ChatOptions | None = None,
    ) -> list[int]:
        """Render a conversation (and the tools the model may call) as the model's chat prompt.

        For a Mistral tokenizer the ids equal ``MistralTokenizer.encode_chat_completion(ChatCompletionRequest(...))
        .tokens`` of ``mistral-common`` for that version (see :mod:`cluster.text.chat_format` for the accepted OpenAI
        shapes); for a Hugging Face tokenizer they equal transformers' ``apply_chat_template(messages, tools=tools,
        add_generation_prompt=True)``. ``options`` (:class:`~cluster.text.chat_template.ChatOptions`): vLLM's
        add_generation_prompt, continue_final_message, documents and chat_template_kwargs.

        Args:
            messages: OpenAI chat messages: ``role`` and ``content`` (a string or text parts), assistant
                ``tool_calls``, tool results (role ``tool`` with ``tool_call_id``).
            tools: OpenAI tools, ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.

        Raises:
            ChatFormatError: The conversation or tools cannot be rendered in this model's format; ``param`` is
                ``"messages"`` or ``"tools"`` (or the option at fault).
        """
        return self._backend.encode_chat(messages, tools, options)
