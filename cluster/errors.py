"""Every error mixserve raises on purpose, in one hierarchy.

The classes say what went wrong; the serving edge (:mod:`cluster.serve.ingress.errors`) maps each class to one HTTP
status and one gRPC code in a single table. Anything that is not a :class:`MixserveError` is a bug in our code and is
reported as an internal error with a request id (the traceback goes to the server log, never to the client).

    MixserveError
    +-- InvalidRequestError (ValueError)      the request is wrong; ``param`` names the field
    |   +-- PromptTooLongError                prompt + max_tokens exceed the context
    |   +-- SamplingParamsError               a sampling parameter is out of range
    |   +-- ChatFormatError                   the messages cannot be rendered as a chat prompt
    +-- AuthenticationError                   missing or wrong API key
    +-- ModelNotFoundError                    the request names a model this server does not serve
    +-- RequestTimeoutError                   the request did not finish within its deadline
    +-- EngineOverloadedError                 the waiting queue is full
    +-- UnavailableError                      the server cannot serve now; later requests may succeed
    |   +-- ExpertWorkerError                 an expert worker died or did not answer
    |   +-- EngineStoppedError                the engine was shut down
    +-- InternalError                         a bug: a step failed for a reason that is not a worker's
    +-- SetupError (ValueError)               bad configuration found before serving starts
        +-- ConfigError                       the checkpoint's config.json / params.json
        +-- CheckpointError                   the checkpoint's tensors
        +-- PlacementError                    expert placement or Ray resources
        +-- AppArgsError                      the Serve application's arguments
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _rebuild(cls: type[MixserveError], message: str, param: str | None, extra: dict[str, Any]) -> MixserveError:
    err = cls.__new__(cls)
    MixserveError.__init__(err, message, param=param)
    err.__dict__.update(extra)
    return err


class MixserveError(Exception):
    """Base of every error raised on purpose. ``param`` names the request field at fault, when there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Callable[..., MixserveError], tuple[Any, ...]]:
        # Errors cross Ray (actor replies, Serve streams): keep the keyword-only ``param`` and any extra fields.
        extra = {k: v for k, v in self.__dict__.items() if k not in ("message", "param")}
        return (_rebuild, (type(self), self.message, self.param, extra))


class InvalidRequestError(MixserveError, ValueError):
    """The request itself is wrong (bad parameter, prompt too long)."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus max_tokens does not fit the model's context."""


class SamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range; ``param`` names it."""


class ChatFormatError(InvalidRequestError):
    """The chat messages cannot be rendered in the model's chat format."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param)


class AuthenticationError(MixserveError):
    """Missing or wrong API key."""


class ModelNotFoundError(MixserveError):
    """The request names a model this server does not serve."""

    def __init__(self, message: str, *, param: str | None = "model") -> None:
        super().__init__(message, param=param)


class RequestTimeoutError(MixserveError):
    """The request did not finish within its deadline."""


class EngineOverloadedError(MixserveError):
    """The waiting queue is full; try again later."""


class UnavailableError(MixserveError):
    """The server cannot serve this request now; later requests may succeed."""


class ExpertWorkerError(UnavailableError):
    """An expert worker died or did not answer; requests in flight fail (unless another copy of its experts takes
    over: ``expert_replicas``), later ones succeed once it is back. ``worker`` names it when one worker is at fault."""

    def __init__(self, message: str, *, worker: int | None = None) -> None:
        super().__init__(message)
        self.worker = worker


class ExpertWorkerLate(ExpertWorkerError):
    """A worker has not answered a layer within the bound its usual exchanges give (``router.latency``): with
    copies of its experts the layer goes to them and the late reply is dropped."""


class EngineStoppedError(UnavailableError):
    """The engine was shut down."""


class InternalError(MixserveError):
    """A failure that is a bug in mixserve, not the client's or a worker's. ``request_id`` finds it in the log."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class SetupError(MixserveError, ValueError):
    """Configuration found wrong before serving starts (model files, placement, deploy arguments)."""


class ConfigError(SetupError):
    """config.json / params.json is missing, malformed or describes an unsupported model."""


class CheckpointError(SetupError):
    """A checkpoint tensor is missing, unexpected, wrongly shaped, corrupt or stored unsafely."""


class PlacementError(SetupError):
    """The expert placement or the Ray resources it asks for cannot work."""


class AppArgsError(SetupError):
    """The Serve application's arguments are invalid."""
