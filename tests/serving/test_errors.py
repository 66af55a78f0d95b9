"""The one error table of the serving edge: every class of cluster/errors.py -> HTTP status, OpenAI type, gRPC
code; anything else -> 500 / INTERNAL with a request id, traceback in the log and never in the body."""

from __future__ import annotations

import json
import logging
import pickle

import grpc
import pytest

from cluster import errors as E
from cluster.serve.ingress.body import validation_error
from cluster.serve.ingress.errors import (
    ERROR_TABLE,
    INTERNAL,
    GrpcStatusError,
    RequestTooLargeError,
    api_error,
    error_response,
    http_error,
    kind_of,
    set_grpc_status,
)
from cluster.serve.ingress.openai_api.responses import ErrorResponse

S = grpc.StatusCode
EXPECTED = [
    (E.InvalidRequestError("bad", param="n"), 400, "invalid_request_error", S.INVALID_ARGUMENT),
    (E.PromptTooLongError("long", param="prompt"), 400, "invalid_request_error", S.INVALID_ARGUMENT),
    (E.SamplingParamsError("top_p", param="top_p"), 400, "invalid_request_error", S.INVALID_ARGUMENT),
    (E.ChatFormatError("order"), 400, "invalid_request_error", S.INVALID_ARGUMENT),
    (E.AuthenticationError("invalid API key"), 401, "authentication_error", S.UNAUTHENTICATED),
    (E.ModelNotFoundError("no such model"), 404, "not_found_error", S.NOT_FOUND),
    (E.RequestTimeoutError("too slow"), 408, "timeout_error", S.DEADLINE_EXCEEDED),
    (E.EngineOverloadedError("queue full"), 503, "service_unavailable", S.RESOURCE_EXHAUSTED),
    (E.UnavailableError("later"), 503, "service_unavailable", S.UNAVAILABLE),
    (E.ExpertWorkerError("expert worker 1 died"), 503, "service_unavailable", S.UNAVAILABLE),
    (E.EngineStoppedError("stopped"), 503, "service_unavailable", S.UNAVAILABLE),
    (E.InternalError("step failed", request_id="cmpl-1-0"), 500, "internal_error", S.INTERNAL),
    (RequestTooLargeError("too big"), 413, "invalid_request_error", S.RESOURCE_EXHAUSTED),
]


class FakeGrpcContext:
    def __init__(self) -> None:
        self.code = None
        self.details = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.mark.parametrize(("exc", "status", "type_", "code"), EXPECTED, ids=[type(e[0]).__name__ for e in EXPECTED])
def test_each_error_class_maps_to_one_status_type_and_grpc_code(exc, status, type_, code):
    for e in (exc, pickle.loads(pickle.dumps(exc))):  # as raised here, and as it arrives over Ray
        kind = kind_of(e)
        assert (kind.status, kind.type, kind.grpc_code) == (status, type_, code)
        err = api_error(e, request_id="chatcmpl-x")
        body = err.body()
        assert body["error"]["code"] == status and body["error"]["type"] == type_
        assert body["error"]["param"] == getattr(exc, "param", None)
        ErrorResponse.model_validate(body)
        ctx = FakeGrpcContext()
        set_grpc_status(ctx, err)
        assert (ctx.code, ctx.details) == (code, err.message)
        response = error_response(err)
        assert response.status_code == status and json.loads(response.body) == body


def test_params_and_messages_of_client_errors_are_kept():
    err = api_error(E.SamplingParamsError("top_p must be a number in (0, 1], got 2", param="top_p"))
    assert err.body()["error"] == {
        "message": "top_p must be a number in (0, 1], got 2",
        "type": "invalid_request_error",
        "param": "top_p",
        "code": 400,
    }
    assert api_error(E.ChatFormatError("message 0: ...")).param == "messages"
    assert api_error(E.ModelNotFoundError("the model 'gpt-4' does not exist")).param == "model"


def test_the_table_covers_every_serving_error_class_of_cluster_errors():
    serving = [
        cls
        for cls in vars(E).values()
        if isinstance(cls, type) and issubclass(cls, E.MixserveError) and not issubclass(cls, E.SetupError)
    ]
    serving.remove(E.MixserveError)
    for cls in serving:
        assert any(base in ERROR_TABLE for base in cls.__mro__), cls


def test_a_bug_is_500_with_a_request_id_and_the_traceback_only_in_the_log(caplog):
    def buggy():
        return {}["missing"]

    try:
        buggy()
    except KeyError as e:
        exc = e
    with caplog.at_level(logging.ERROR, logger="mixserve"):
        err = api_error(exc, request_id="chatcmpl-abc123")
    assert kind_of(exc) is INTERNAL
    assert err.status == 500 and err.kind.grpc_code == S.INTERNAL
    body = json.dumps(err.body())
    assert "chatcmpl-abc123" in err.message and "server log" in err.message
    assert "Traceback" not in body and "buggy" not in body and "missing" not in body and "KeyError" not in body
    record = next(r for r in caplog.records if "chatcmpl-abc123" in r.getMessage())
    assert record.exc_info is not None and record.exc_info[1] is exc  # the traceback goes to the server log


def test_a_bug_without_a_request_id_gets_a_fresh_one(caplog):
    with caplog.at_level(logging.ERROR, logger="mixserve"):
        first = api_error(RuntimeError("boom"))
        second = api_error(RuntimeError("boom"))
    assert first.status == second.status == 500
    assert "request id req-" in first.message and first.message != second.message
    assert "boom" not in first.message


def test_setup_errors_reaching_a_request_are_internal():
    err = api_error(E.CheckpointError("tensor x is corrupt"), request_id="cmpl-1")
    assert err.status == 500 and "cmpl-1" in err.message and "tensor" not in err.message


def test_an_internal_error_names_the_request_id_it_failed_under(caplog):
    with caplog.at_level(logging.ERROR, logger="mixserve"):
        err = api_error(E.InternalError("internal error in a model step (RuntimeError)", request_id="cmpl-9-0"))
    assert err.status == 500 and "cmpl-9-0" in err.message
    assert any("cmpl-9-0" in r.getMessage() for r in caplog.records)


def test_http_layer_errors_and_validation_errors():
    assert http_error(404, "Not Found").body()["error"] == {
        "message": "Not Found",
        "type": "not_found_error",
        "param": None,
        "code": 404,
    }
    assert http_error(405, "Method Not Allowed").status == 405
    e = validation_error([{"loc": ("body", "max_tokens"), "msg": "Input should be a valid integer", "type": "x"}])
    assert isinstance(e, E.InvalidRequestError) and e.param == "max_tokens"
    assert api_error(e).body()["error"]["message"] == "max_tokens: Input should be a valid integer"
    assert "not valid JSON" in validation_error([{"type": "json_invalid", "loc": ("body", 0)}]).message


def test_grpc_status_without_a_context_is_a_no_op():
    set_grpc_status(None, api_error(E.AuthenticationError("invalid API key")))
    assert issubclass(GrpcStatusError, RuntimeError)
