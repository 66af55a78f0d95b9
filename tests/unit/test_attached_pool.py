"""A frontend attached to a shared expert pool (``AttachedPool``) leaves it without waiting forever: when the pool's
owner is itself going away (its Serve deployment deleted first) the detach call never answers, and the frontend's
replica must still finish shutting down. Fakes stand in for the owner's handle (its calls return Serve-style
responses), so no Ray runs here."""

from __future__ import annotations

import threading
import time
from typing import Any

import cluster.runtime.pool as pool
from cluster.runtime.pool import AttachedPool


class _Response:
    """A Serve DeploymentResponse: ``result(timeout_s)`` waits for an answer that may never come."""

    def __init__(self, value: Any, answered: threading.Event) -> None:
        self.value, self.answered, self.cancelled = value, answered, False

    def result(self, timeout_s: float | None = None) -> Any:
        if not self.answered.wait(timeout_s):
            raise TimeoutError(f"no answer in {timeout_s} s")
        return self.value

    def cancel(self) -> None:
        self.cancelled = True


class _Owner:
    """The pool owner's handle; ``alive`` False: it takes calls but never answers them."""

    def __init__(self, *, alive: bool) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.responses: list[_Response] = []
        self.answered = threading.Event()
        if alive:
            self.answered.set()

    def __getattr__(self, method: str) -> Any:
        owner = self

        class _Method:
            @staticmethod
            def remote(*args: Any) -> _Response:
                owner.calls.append((method, args))
                view = {"handles": ["w0", "w1"], "placement": None, "pool": "pool-a"}
                owner.responses.append(_Response(view if method == "attach" else None, owner.answered))
                return owner.responses[-1]

        return _Method()


def _shut_down(attached: AttachedPool, deadline_s: float) -> bool:
    done = threading.Thread(target=attached.shutdown, daemon=True)
    done.start()
    end = time.monotonic() + deadline_s
    while done.is_alive() and time.monotonic() < end:
        time.sleep(0.01)
    return not done.is_alive()


def test_a_live_owner_takes_the_detach():
    owner = _Owner(alive=True)
    attached = AttachedPool(owner, "frontend-1", {"expert_workers": 2})
    assert (attached.handles, attached.name) == (["w0", "w1"], "pool-a")
    assert _shut_down(attached, 30.0)
    assert owner.calls == [("attach", ("frontend-1", {"expert_workers": 2})), ("detach", ("frontend-1",))]
    assert not any(r.cancelled for r in owner.responses)


def test_an_owner_that_never_answers_does_not_hold_the_shutdown(monkeypatch):
    """The detach waits DETACH_TIMEOUT_S (shortened here), is cancelled, and the shutdown returns; a wait without
    end would leave the thread running past the deadline."""
    owner = _Owner(alive=True)
    attached = AttachedPool(owner, "frontend-1", {})
    owner.answered.clear()  # the owner is going away: calls go unanswered from now on
    monkeypatch.setattr(pool, "DETACH_TIMEOUT_S", 0.05)
    assert _shut_down(attached, 30.0), "shutdown still waiting for the owner's answer"
    assert owner.calls[-1] == ("detach", ("frontend-1",)) and owner.responses[-1].cancelled
