"""The one place where an exception becomes what a client sees: HTTP status, OpenAI error body, gRPC code.

:data:`ERROR_TABLE` maps each class of :mod:`cluster.errors` to its HTTP status, OpenAI error ``type`` and gRPC
code; a class not in the table takes the entry of its nearest base class (the MRO). Anything that is not a
:class:`~cluster.errors.MixserveError` is a bug in mixserve: the client gets 500 / INTERNAL with a request id, and
the traceback goes to the server log under that id, never into the response.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi.responses import JSONResponse

from cluster.errors import (
    AuthenticationError,
    EngineOverloadedError,
    InternalError,
    InvalidRequestError,
    MixserveError,
    ModelNotFoundError,
    RequestTimeoutError,
    UnavailableError,
)

log = logging.getLogger("mixserve")


@dataclass(frozen=True)
class ErrorKind:
    """How one class of error reaches the client."""

    status: int  # HTTP status; also the OpenAI body's ``code``
    type: str  # OpenAI error ``type``
    grpc_code: grpc.StatusCode


INTERNAL = ErrorKind(500, "internal_error", grpc.StatusCode.INTERNAL)


class RequestTooLargeError(InvalidRequestError):
    """The request body (HTTP) or message (gRPC) is larger than the server accepts (``max_request_bytes``).

    Serving-only: no layer below the ingress ever sees such a request."""


ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidRequestError: ErrorKind(400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    RequestTooLargeError: ErrorKind(413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    AuthenticationError: ErrorKind(401, "authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    ModelNotFoundError: ErrorKind(404, "not_found_error", grpc.StatusCode.NOT_FOUND),
    RequestTimeoutError: ErrorKind(408, "timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED),
    EngineOverloadedError: ErrorKind(503, "service_unavailable", grpc.StatusCode.RESOURCE_EXHAUSTED),
    UnavailableError: ErrorKind(503, "service_unavailable", grpc.StatusCode.UNAVAILABLE),
    InternalError: INTERNAL,
}


def kind_of(exc: BaseException) -> ErrorKind:
    """The table entry of ``exc``'s class or its nearest listed base class; :data:`INTERNAL` when none is listed."""
    for cls in type(exc).__mro__:
        kind = ERROR_TABLE.get(cls)
        if kind is not None:
            return kind
    return INTERNAL


@dataclass(frozen=True)
class ApiError:
    """An error as the client sees it."""

    kind: ErrorKind
    message: str
    param: str | None = None

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self) -> dict[str, Any]:
        """The OpenAI error shape."""
        return {"error": {"message": self.message, "type": self.kind.type, "param": self.param, "code": self.status}}


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def internal_message(request_id: str) -> str:
    return f"internal server error (request id {request_id}); see the server log"


def api_error(exc: BaseException, *, request_id: str | None = None) -> ApiError:
    """What the client is told about ``exc``.

    A :class:`MixserveError` keeps its message and ``param``. A 500 names a request id to find it in the server
    log: an :class:`InternalError` carries the id its step failed under (its traceback was logged where it
    happened); anything else is logged here, traceback and all, under ``request_id`` (a fresh one when none is
    given) and the client gets only that id.
    """
    kind = kind_of(exc)
    if kind is not INTERNAL and isinstance(exc, MixserveError):
        return ApiError(kind, exc.message, exc.param)
    if isinstance(exc, InternalError):
        rid = exc.request_id or request_id or new_request_id("req")
        log.error("internal error in request %s: %s", rid, exc.message)
        message = exc.message if rid in exc.message else f"{exc.message} (request id {rid})"
        return ApiError(kind, message)
    rid = request_id or new_request_id("req")
    log.exception("internal error in request %s", rid, exc_info=exc)
    return ApiError(kind, internal_message(rid))


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def http_error(status: int, message: str) -> ApiError:
    """An error the HTTP layer itself produces (unknown path, wrong method): the type of a listed kind with that
    status, else ``error``."""
    for kind in ERROR_TABLE.values():
        if kind.status == status:
            return ApiError(kind, message)
    return ApiError(ErrorKind(status, "error", grpc.StatusCode.UNKNOWN), message)


class GrpcStatusError(RuntimeError):
    """Raised by a streaming gRPC method after it set the status on the context (Ray Serve keeps that code)."""


def set_grpc_status(grpc_context: Any, err: ApiError) -> None:
    """Set the gRPC status code and details of a failed call (no-op without a context, e.g. a direct call)."""
    if grpc_context is not None:
        grpc_context.set_code(err.kind.grpc_code)
        grpc_context.set_details(err.message)
