"""Who may call, and for which model: the API key (HTTP header or gRPC metadata) and the requested model name."""

from __future__ import annotations

import hmac

from cluster.errors import AuthenticationError, ModelNotFoundError


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """With an API key configured, ``authorization`` must be ``Bearer <key>`` (compared in constant time)."""
    if expected is None:
        return
    if not authorization:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected.encode()):
        raise AuthenticationError("invalid API key")


def check_model(served: str, model: str | None) -> None:
    """The request may name the served model or none at all."""
    if model not in (None, "", served):
        raise ModelNotFoundError(f"the model {model!r} does not exist; this server serves {served!r}")
