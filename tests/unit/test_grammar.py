"""Structured output end to end on a random-weight model: whatever the weights, every output follows its grammar
(checked by jsonschema and re, independent of llguidance), and bad specs are 400s naming response_format."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.engine.sampling import StructuredOutput
from cluster.errors import SamplingParamsError
from tests.helpers import SCHEMA


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("grammar"), TinyModelSpec(hidden=64, intermediate=128), seed=4)
    with LLM(folder, max_num_seqs=8, progress=False) as llm:
        yield llm


def test_json_schema_outputs_always_validate(llm):
    params = [
        SamplingParams(
            max_tokens=96,
            temperature=1.0,
            seed=s,
            structured_output=StructuredOutput("json_schema", json.dumps(SCHEMA)),
        )
        for s in range(50)
    ]
    outs = llm.generate([[1, 415, 2936]] * 50, params)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 10  # the grammar constrains, the model still chooses


@pytest.mark.parametrize(
    ("kind", "spec", "check"),
    [
        ("regex", r"[a-z]{3}-[0-9]{2}", lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
        ("choice", json.dumps(["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
        ("lark", 'start: "x" NUM\nNUM: /[0-9]{1,3}/', lambda t: re.fullmatch(r"x[0-9]{1,3}", t)),
    ],
)
def test_other_grammars(llm, kind, spec, check):
    params = [
        SamplingParams(max_tokens=64, temperature=1.0, seed=s, structured_output=StructuredOutput(kind, spec))
        for s in range(8)
    ]
    for o in llm.generate([[1, 330]] * 8, params):
        assert check(o.text), (kind, o.text)


def test_json_object_outputs_are_objects_or_cut_short_inside_one(llm):
    """Any JSON object is unbounded: an output that stops is a JSON object; one that ran out of tokens is the start
    of one (a string still open)."""
    params = [
        SamplingParams(max_tokens=48, temperature=1.0, seed=s, structured_output=StructuredOutput("json_object"))
        for s in range(8)
    ]
    for o in llm.generate([[1, 330]] * 8, params):
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            assert o.finish_reason == "length" and o.text.startswith("{")


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("json_schema", "{not json"),
        ("json_schema", "[1, 2]"),
        ("regex", "(unclosed"),
        ("choice", "[]"),
        ("lark", "start: ???"),
    ],
)
def test_bad_specs_name_response_format(llm, kind, spec):
    with pytest.raises(SamplingParamsError) as err:
        llm.generate([[1, 330]], SamplingParams(structured_output=StructuredOutput(kind, spec)))
    assert err.value.param == "response_format"
