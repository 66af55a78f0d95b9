"""What the frontend deployment's ``generate`` stream says first, read by the ingress: the request was accepted, and by
which frontend replica (:class:`Accepted`); or the error that refused it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accepted:
    """The request is queued in frontend replica ``frontend``'s engine; its outputs follow."""

    frontend: str

    @property
    def engine(self) -> str:
        """The short name metrics label it with (the replica id's last part)."""
        return self.frontend.rsplit("#", 1)[-1]
