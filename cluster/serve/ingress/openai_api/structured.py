"""Structured output at the serving edge: which request field constrains the output, as a
:class:`~cluster.engine.sampling.StructuredOutput` the engine enforces with a grammar (:mod:`cluster.engine.grammar`).

The fields, in the order a conflict is reported (at most one may constrain a request; the second is a 400 naming
it): OpenAI's ``response_format`` (``json_object``, or ``json_schema`` with ``json_schema.schema``; ``text`` is no
constraint), vLLM's ``guided_json`` (a schema, as an object or its JSON text), ``guided_regex``, ``guided_choice``
(a list of strings), ``guided_grammar`` (Lark), vLLM's ``structured_outputs`` (its current name for the same:
``json``, ``regex``, ``choice``, ``grammar`` or ``json_object``), and on chat a ``tool_choice`` that forces a call
(:mod:`cluster.serve.ingress.openai_api.tools`).

The engine checks a spec when the request is queued and raises :class:`~cluster.errors.SamplingParamsError` on
``response_format`` for a bad one; :func:`submit_constrained` renames it to the field the spec came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.engine.sampling import SamplingParams, StructuredOutput
from cluster.errors import InvalidRequestError, SamplingParamsError
from cluster.serve.ingress.context import ServeContext
from cluster.serve.ingress.openai_api.extras import StructuredOutputsIn
from cluster.serve.ingress.openai_api.protocol import ResponseFormat
from cluster.serve.ingress.streams import Choice

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


class _Constrainable(Protocol):
    response_format: ResponseFormat | None
    guided_json: dict[str, Any] | str | None
    guided_regex: str | None
    guided_choice: list[str] | None
    guided_grammar: str | None
    structured_outputs: StructuredOutputsIn | None


@dataclass(frozen=True)
class Constraint:
    """A grammar for the output, and the request field it came from (errors about its spec name that field)."""

    output: StructuredOutput
    param: str


def json_schema_constraint(schema: Any, param: str) -> Constraint:
    return Constraint(StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False)), param)


def _guided_json(value: dict[str, Any] | str, param: str = "guided_json") -> Constraint:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidRequestError(f"{param}: not a JSON schema: {e}", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param}: a JSON schema is a JSON object", param=param)
    return json_schema_constraint(value, param)


def _constraints(req: _Constrainable) -> list[Constraint]:
    found: list[Constraint] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(Constraint(StructuredOutput("json_object"), "response_format"))
    elif rf is not None and rf.json_schema is not None:
        found.append(json_schema_constraint(rf.json_schema.json_schema, "response_format"))
    if req.guided_json is not None:
        found.append(_guided_json(req.guided_json))
    if req.guided_regex is not None:
        found.append(Constraint(StructuredOutput("regex", req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append(Constraint(StructuredOutput("choice", json.dumps(req.guided_choice)), "guided_choice"))
    if req.guided_grammar is not None:
        found.append(Constraint(StructuredOutput("lark", req.guided_grammar), "guided_grammar"))
    if req.structured_outputs is not None:
        output, schema = req.structured_outputs.output()
        if output is not None:
            found.append(Constraint(output, "structured_outputs"))
        elif schema is not None:
            found.append(_guided_json(schema, "structured_outputs"))
    return found


def request_constraint(req: _Constrainable, extra: Constraint | None = None) -> Constraint | None:
    """The one constraint of a request (``extra``: the one a forced tool call adds), or None; a 400 naming the
    second field when two fields constrain it."""
    found = _constraints(req) + ([extra] if extra is not None else [])
    if len(found) > 1:
        first, second = found[0].param, found[1].param
        raise InvalidRequestError(
            f"{second}: only one of {', '.join(FIELDS)} (and a tool_choice that forces a call) may constrain the "
            f"output; {first} already does",
            param=second,
        )
    return found[0] if found else None


def renamed(err: SamplingParamsError, constraint: Constraint | None) -> SamplingParamsError:
    """The engine's error about a bad spec, naming the field the spec came from."""
    if constraint is None or err.param != "response_format" or constraint.param == "response_format":
        return err
    return SamplingParamsError(f"{constraint.param}: {err.message}", param=constraint.param)


async def submit_constrained(
    ctx: ServeContext,
    prompts: list[list[int]],
    params: SamplingParams,
    request_id: str,
    constraint: Constraint | None,
) -> list[Choice]:
    """:meth:`FrontendClient.submit_all`, with a bad spec reported on its own field."""
    try:
        return await ctx.frontend.submit_all(prompts, params, request_id)
    except SamplingParamsError as e:
        raise renamed(e, constraint) from None
