"""CORS for the HTTP API, configured by the application's ``cors_allowed_origins`` (off when empty).

The FastAPI app is built when the module is imported (Ray Serve copies it into each replica), before the
application's arguments are known; :class:`ConfiguredCORS` is added to it there and, on the first request of a
replica, becomes Starlette's ``CORSMiddleware`` with the origins the ingress replica configured (or nothing at all).
One ingress replica is one process, so the setting is per process.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

ALLOWED_METHODS = ["GET", "POST", "OPTIONS"]
ALLOWED_HEADERS = ["authorization", "content-type"]

_origins: list[str] = []


def configure(origins: list[str]) -> None:
    """The origins browsers may call this replica's API from (``*``: any); empty turns CORS off."""
    _origins[:] = origins


class ConfiguredCORS:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._inner is None:
            self._inner = (
                CORSMiddleware(
                    self.app,
                    allow_origins=list(_origins),
                    allow_methods=ALLOWED_METHODS,
                    allow_headers=ALLOWED_HEADERS,
                    allow_credentials=False,
                )
                if _origins
                else self.app
            )
        await self._inner(scope, receive, send)
