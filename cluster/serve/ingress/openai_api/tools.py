"""Tools on chat completions, request side: what the prompt carries and how the output is constrained.

``tool_choice`` (default ``auto`` with tools, ``none`` without):

* ``none``: the prompt carries no tools; plain generation.
* ``auto``: the tools go into the prompt in the model's native format (mistral-common v2+ or the chat template);
  the model decides, and its native output (``[TOOL_CALLS]...``) is parsed
  (:mod:`cluster.serve.ingress.openai_api.tool_output`). A Mistral v1 tokenizer cannot carry tools: 400.
* ``required``: the output is constrained to a non-empty JSON array of calls
  ``[{"name": <a tool's name>, "arguments": <an object valid for that tool's parameters>}, ...]`` (exactly one call
  when ``parallel_tool_calls`` is false).
* ``{"type": "function", "function": {"name": f}}``: the output is constrained to the arguments object of ``f``.

The constrained modes work with any tokenizer: the tools go into the prompt where the chat format has a place for
them (not on v1), and the grammar makes every call's arguments validate against its function's schema.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.errors import InvalidRequestError
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest, ToolDef
from cluster.serve.ingress.openai_api.structured import Constraint, json_schema_constraint
from cluster.text.tokenizer import Tokenizer

ToolMode = Literal["none", "auto", "required", "named"]
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
_DEFS = ("$defs", "definitions")


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: ToolMode = "none"
    prompt_tools: list[dict[str, Any]] | None = None  # rendered into the prompt (None: no tools there)
    constraint: Constraint | None = None  # the grammar of required / named
    function: str | None = None  # named: the function every choice calls
    names: tuple[str, ...] = field(default_factory=tuple)


def native_tools(tokenizer: Tokenizer) -> bool:
    """Whether the model's chat format has a place for tools (every Mistral version but v1; chat templates)."""
    return tokenizer.version != "v1"


def plan_tools(req: ChatCompletionRequest, tokenizer: Tokenizer) -> ToolPlan:
    """The plan of a request; a 400 naming ``tools`` or ``tool_choice`` when they do not go together."""
    tools = list(req.tools or [])
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise InvalidRequestError("tool_choice needs tools: the request has none", param="tool_choice")
        return ToolPlan()
    names = [t.function.name for t in tools]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise InvalidRequestError(f"tools: the function name {duplicate!r} is given twice", param="tools")
    if choice == "none":
        return ToolPlan(names=tuple(names))
    native = native_tools(tokenizer)
    prompt_tools = as_prompt_tools(tools) if native else None
    if choice == "auto":
        if not native:
            raise InvalidRequestError(
                "tool_choice 'auto' (the default with tools): this model's chat format (Mistral tokenizer v1) has no "
                "place for tools, so the model cannot decide to call one; use tool_choice 'required' or "
                "{'type': 'function', 'function': {'name': ...}} (the output is then constrained to a call), or 'none'",
                param="tool_choice",
            )
        return ToolPlan("auto", prompt_tools, names=tuple(names))
    if choice == "required":
        schema = calls_schema(tools, single=req.parallel_tool_calls is False)
        return ToolPlan("required", prompt_tools, json_schema_constraint(schema, "tools"), names=tuple(names))
    name = choice.function.name
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None:
        raise InvalidRequestError(
            f"tool_choice: the function {name!r} is not among the tools ({', '.join(names)})", param="tool_choice"
        )
    schema = parameters_schema(tool)
    return ToolPlan("named", prompt_tools, json_schema_constraint(schema, "tools"), name, tuple(names))


def as_prompt_tools(tools: list[ToolDef]) -> list[dict[str, Any]]:
    """The tools as the chat encoder takes them (OpenAI's shape, without ``strict``)."""
    return [t.model_dump(exclude_none=True, exclude={"function": {"strict"}}) for t in tools]


def parameters_schema(tool: ToolDef) -> dict[str, Any]:
    """The JSON schema of a function's arguments object (no parameters: an empty object)."""
    return copy.deepcopy(tool.function.parameters) if tool.function.parameters is not None else dict(NO_ARGUMENTS)


def calls_schema(tools: list[ToolDef], *, single: bool = False) -> dict[str, Any]:
    """A JSON array of calls ``{"name", "arguments"}``, each valid for its function; ``single``: exactly one.

    The functions' ``$defs`` / ``definitions`` move to the root, where their ``$ref`` s point."""
    defs: dict[str, dict[str, Any]] = {}
    variants = []
    for tool in tools:
        params = parameters_schema(tool)
        for key in _DEFS:
            for name, definition in (params.pop(key, None) or {}).items():
                known = defs.setdefault(key, {}).setdefault(name, definition)
                if known != definition:
                    raise InvalidRequestError(
                        f"tools: two functions define {key}/{name} differently; tool_choice 'required' needs one "
                        "schema for all of them",
                        param="tools",
                    )
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if single:
        schema["maxItems"] = 1
    schema.update(defs)
    return schema
