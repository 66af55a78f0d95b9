"""The chat template and special tokens of a Hugging Face tokenizer folder, read without any optional package.

``tokenizer_config.json`` (special tokens, ``chat_template``) and ``chat_template.jinja``; used to pick a folder's
tokenizer (:func:`cluster.text.tokenizer.find_tokenizer_file`) and by :mod:`cluster.text.hf_tokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.errors import SetupError

__all__ = ["CONFIG_FILE_NAME", "TEMPLATE_FILE_NAME", "chat_template_sources", "mistral_format", "read_config"]

CONFIG_FILE_NAME = "tokenizer_config.json"
TEMPLATE_FILE_NAME = "chat_template.jinja"


def read_config(folder: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` of ``folder`` (empty when there is none).

    Raises:
        SetupError: The file is not a JSON object.
    """
    path = folder / CONFIG_FILE_NAME
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SetupError(f"{path}: not readable as JSON: {err}") from err
    if not isinstance(config, dict):
        raise SetupError(f"{path}: expected a JSON object")
    return config


def chat_template_sources(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The folder's chat template(s): ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
    (one string, or named templates)."""
    template_file = folder / TEMPLATE_FILE_NAME
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)} or None
    return None


def mistral_format(folder: Path) -> bool | None:
    """Whether the folder's chat template is Mistral's ``[INST]`` format; ``None`` when it has no template."""
    sources = chat_template_sources(folder, read_config(folder))
    if sources is None:
        return None
    texts = [sources] if isinstance(sources, str) else list(sources.values())
    return any("[INST]" in text for text in texts)
