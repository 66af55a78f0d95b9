"""The hard edges of a request body: size, JSON shape and text, checked before anything expensive happens.

- :func:`read_body`: at most ``limit`` bytes, refused from the ``Content-Length`` header before reading and while
  the body streams in (413).
- :func:`load_json`: strict UTF-8, JSON nested at most :data:`MAX_JSON_DEPTH` deep, numbers of at most
  :data:`MAX_NUMBER_CHARS` characters and finite, no ``NaN``/``Infinity`` literals, no lone surrogates
  (``"\\ud800"``) in any string or key; every problem is a 400 naming the field (``param``) where there is one,
  never a RecursionError or ValueError reaching the client as a 500.
- :func:`parse_body`: the JSON as a request model; :func:`validation_error` turns pydantic's errors into one 400
  naming the field (an unknown field says so).
- :func:`check_prompt_chars`: a prompt too long to possibly fit the context is refused before it is tokenized.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from cluster.errors import InvalidRequestError, PromptTooLongError
from cluster.serve.ingress.errors import RequestTooLargeError

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_JSON_DEPTH = 64
MAX_NUMBER_CHARS = 40
# Characters one token can stand for, generously: the longest piece of the Mistral/Mixtral v1 vocabulary is 16.
MAX_CHARS_PER_TOKEN = 32

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")

# Fields that belong to work not done yet or to features this server does not have: named in the 400.
UNSUPPORTED = {
    "functions": "the legacy function calling is not supported; use tools and tool_choice",
    "function_call": "the legacy function calling is not supported; use tools and tool_choice",
    "guided_decoding_backend": "structured output has one backend here (llguidance); leave guided_decoding_backend out",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported: JSON is laid out like json.dumps",
    "audio": "audio output is not supported",
    "reasoning_effort": "reasoning_effort is not supported: the model does not reason",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise InvalidRequestError("the Content-Length header is not a number")
        if int(length) > limit:
            raise RequestTooLargeError(f"the request body is {int(length)} bytes; this server accepts at most {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body is larger than {limit} bytes, the most this server accepts")
        chunks.append(chunk)
    return b"".join(chunks)


class _BadNumber:
    """A JSON number no field can take (too many characters, or not finite): reported with its field's name."""

    def __init__(self, text: str) -> None:
        self.text = text


def load_json(raw: bytes) -> Any:
    """Parse a JSON body with the limits of the module docstring."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("the request body is not valid JSON: it is not UTF-8") from None
    suspicious = False

    def number(kind: type) -> Any:
        def parse(s: str) -> Any:
            nonlocal suspicious
            if len(s) <= MAX_NUMBER_CHARS:
                value = kind(s)
                if kind is int or math.isfinite(value):
                    return value
            suspicious = True
            return _BadNumber(s)

        return parse

    def constant(name: str) -> Any:
        raise InvalidRequestError(f"the request body is not valid JSON: {name} is not a JSON value")

    try:
        data = json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except RecursionError:
        raise InvalidRequestError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError:
        raise InvalidRequestError("the request body is not valid JSON") from None
    # The walk below only when something may be wrong: brackets are an upper bound of the depth.
    if suspicious or _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        check_json(data)
    return data


def _path(parts: tuple[Any, ...]) -> str | None:
    return ".".join(str(p) for p in parts) or None


def check_json(data: Any) -> None:
    """Depth, numbers and text of a parsed body; the first problem raises InvalidRequestError naming its field."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        items: Any = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        if len(path) >= MAX_JSON_DEPTH:
            raise InvalidRequestError(f"{path[0]}: nested more than {MAX_JSON_DEPTH} levels deep", param=str(path[0]))
        for key, value in items:
            where = (*path, key)
            if isinstance(key, str) and _SURROGATE.search(key):
                raise InvalidRequestError(
                    f"{_path(path) or 'the body'}: a key is not valid Unicode (it holds a lone surrogate)",
                    param=_path(path),
                )
            if isinstance(value, (dict, list)):
                stack.append((value, where))
            elif isinstance(value, str) and _SURROGATE.search(value):
                raise InvalidRequestError(
                    f"{_path(where)}: the text is not valid Unicode (it holds a lone surrogate)", param=_path(where)
                )
            elif isinstance(value, _BadNumber):
                shown = value.text if len(value.text) <= 20 else value.text[:20] + "..."
                raise InvalidRequestError(
                    f"{_path(where)}: the number {shown} is out of range ({len(value.text)} characters)",
                    param=_path(where),
                )


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic's error location without the union-member tags (``str``, ``list[int]``, ...) it inserts."""
    tags = {"str", "int", "float", "bool", "dict", "list", "none"}
    return tuple(p for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in tags)))


def validation_error(errors: Any) -> InvalidRequestError:
    """One of pydantic's / FastAPI's validation errors as a 400 with ``param`` the field's dotted path: an unknown
    field first, else the most specific (deepest) error."""
    errors = list(errors or [])
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidRequestError("the request body is not valid JSON")
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    # the deepest error; of a union's equally deep ones the last (a number's "valid number", not "valid integer")
    pick = unknown[0] if unknown else max(reversed(errors), key=lambda e: len(e.get("loc", ())), default={})
    loc = _clean_loc(tuple(pick.get("loc", ())))
    param = _path(loc)
    if unknown:
        name = str(loc[-1]) if loc else "?"
        reason = UNSUPPORTED.get(name, "unknown field; the README lists the fields this server accepts")
        return InvalidRequestError(f"{param}: {reason}", param=param)
    msg = str(pick.get("msg", "invalid request")).removeprefix("Value error, ")
    return InvalidRequestError(f"{param}: {msg}" if param else str(msg), param=param)


def validate(data: Any, model: type[ModelT]) -> ModelT:
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def parse_body(raw: bytes, model: type[ModelT]) -> ModelT:
    """The JSON request body as ``model``; InvalidRequestError names the first bad field."""
    return validate(load_json(raw) if raw else None, model)


def check_prompt_chars(chars: int, max_model_len: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt of more characters than ``max_model_len`` tokens can hold."""
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {chars} characters, "
            f"more than {limit} ({MAX_CHARS_PER_TOKEN} per token) could fit",
            param=param,
        )
