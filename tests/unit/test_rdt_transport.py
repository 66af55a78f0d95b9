"""RdtTransport keeps one micro-batch's transfers in flight at a time (router/rdt.py's module docstring says why):
with fake actor handles, every ``start`` waits for the previous start's partials before it submits anything."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from cluster.errors import ExpertWorkerError
from router import rdt
from router.dispatch import WorkerMessage


class _Method:
    """``handle.method.options(...).remote(*args)`` and ``handle.method.remote(*args)``: logs the call, returns a
    fresh ref."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def options(self, **_: Any) -> _Method:
        return self

    def remote(self, *args: Any) -> str:
        ref = f"{self.name}#{sum(1 for e in self.log if e[0] == self.name)}"
        self.log.append((self.name, ref))
        return ref


class _Actor:
    def __init__(self, log: list, name: str) -> None:
        for method in ("run", "echo", "rdt_stage", "rdt_absorb"):
            setattr(self, method, _Method(log, f"{name}.{method}"))


@pytest.fixture
def transport(monkeypatch):
    log: list = []
    t = rdt.GlooTransport([_Actor(log, "w0"), _Actor(log, "w1")], timeout_s=7.0)
    monkeypatch.setattr(t, "_ensure_group", lambda: None)
    monkeypatch.setattr(t, "_me", lambda: _Actor(log, "fe"))
    monkeypatch.setattr(rdt.ray, "wait", lambda refs, **kw: log.append(("wait", list(refs), kw)) or (refs, []))
    return t, log


def _messages() -> list[WorkerMessage]:
    rows = torch.tensor([0, 1])
    experts = torch.tensor([0, 1])
    weights = torch.ones(2)
    return [
        WorkerMessage(worker=w, tokens=torch.tensor([w]), rows=rows, experts=experts, weights=weights) for w in (0, 1)
    ]


def test_a_second_start_waits_for_the_first_ones_partials(transport):
    t, log = transport
    x = torch.randn(2, 4)
    t.start(0, x, _messages())  # micro-batch A
    assert not [e for e in log if e[0] == "wait"]  # nothing was in flight
    first_absorbs = [e[1] for e in log if e[0] == "fe.rdt_absorb"]
    assert len(first_absorbs) == 2
    n = len(log)
    t.start(0, x, _messages())  # micro-batch B
    assert log[n] == ("wait", first_absorbs, {"num_returns": 2, "timeout": 7.0})  # before B submits anything
    per_worker = [["fe.rdt_stage", f"w{w}.run", "fe.rdt_absorb"] for w in (0, 1)]
    assert [e[0] for e in log[n + 1 :]] == per_worker[0] + per_worker[1]


def test_after_a_failure_nothing_is_waited_for(transport):
    t, log = transport
    x = torch.randn(2, 4)
    t.start(0, x, _messages())
    t._invalidate()  # what a failed layer does: the group and what it carried are gone
    t.start(1, x, _messages())
    assert not [e for e in log if e[0] == "wait"]


def test_partials_still_pending_after_the_timeout_fail_the_layer(transport, monkeypatch):
    """The other micro-batch's transfers not back within timeout_s: this layer fails (503 upstream) instead of
    queueing its transfers beside them, and the group is rebuilt by the next step."""
    t, log = transport
    x = torch.randn(2, 4)
    t.start(0, x, _messages())
    half_back = lambda refs, **kw: log.append(("wait", list(refs), kw)) or (refs[:1], refs[1:])  # noqa: E731
    monkeypatch.setattr(rdt.ray, "wait", half_back)
    n = len(log)
    t._group = object()  # what _ensure_group set up
    with pytest.raises(ExpertWorkerError, match=r"other micro-batch's partials over RDT/gloo within 7 s"):
        t.start(0, x, _messages())
    assert [e[0] for e in log[n:]] == ["wait"]  # nothing of this layer was submitted
    assert t._group is None and t._in_flight == []


def _forming(monkeypatch, failures: list[Exception]) -> tuple[rdt.GlooTransport, list]:
    """A transport whose workers answer ping and whose group creation raises ``failures`` in turn, then succeeds."""
    log: list = []
    t = rdt.GlooTransport([_Actor(log, "w0"), _Actor(log, "w1")], timeout_s=7.0)
    for a in t.handles:
        a.ping = _Method(log, "ping")
    monkeypatch.setattr(t, "_me", lambda: "fe")
    monkeypatch.setattr(rdt.ray, "get", lambda refs, **kw: [None for _ in refs])
    monkeypatch.setattr(rdt, "get_collective_groups", lambda actors: [g for e, g in log if e == "created"])
    monkeypatch.setattr(rdt, "destroy_collective_group", lambda g: log.append(("destroyed", g)))

    def create(actors, backend):
        log.append(("create", backend))
        if failures:
            raise failures.pop(0)
        log.append(("created", "group"))
        return "group"

    monkeypatch.setattr(rdt, "create_collective_group", create)
    return t, log


def test_a_group_that_fails_to_form_is_tried_once_more(monkeypatch, caplog):
    t, log = _forming(monkeypatch, [TimeoutError("rank 0 did not publish its address")])
    with caplog.at_level(logging.WARNING, logger="mixserve"):
        t._ensure_group()
    assert [r.getMessage() for r in caplog.records] == [
        "forming the RDT/gloo collective group failed (TimeoutError: rank 0 did not publish its address); trying once "
        "more"
    ]
    assert [e for e in log if e[0] in ("create", "created")] == [("create", "torch_gloo")] * 2 + [("created", "group")]
    assert t._group == "group"
    t._ensure_group()  # formed: not again
    assert sum(1 for e in log if e[0] == "create") == 2


def test_a_group_that_fails_twice_fails_the_layer_with_the_cause(monkeypatch):
    t, log = _forming(monkeypatch, [TimeoutError("rendezvous"), RuntimeError("address already in use")])
    with pytest.raises(ExpertWorkerError) as err:
        t.start(0, torch.randn(2, 4), _messages())
    assert err.value.message == (
        "could not form the RDT/gloo collective group with the expert workers (tried twice): RuntimeError: address "
        "already in use"
    )
    assert t._group is None  # the next step tries again
    t._ensure_group()
    assert t._group == "group"
