"""Errors a user can cause or meet, each mapped to one HTTP status and one gRPC code by the serving layer."""

from __future__ import annotations


class MixserveError(Exception):
    """Base of every error this package raises on purpose."""

    http_status = 500
    grpc_code = "INTERNAL"


class InvalidRequestError(MixserveError, ValueError):
    """The request itself is wrong (bad parameter, prompt too long). ``param`` names the field when known."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context."""


class EngineOverloadedError(MixserveError):
    """The waiting queue is full; try again later."""

    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"


class ExpertWorkerError(MixserveError):
    """An expert worker died or did not answer; requests in flight fail, later ones succeed once it is back."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class EngineStoppedError(MixserveError):
    """The engine was shut down."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
