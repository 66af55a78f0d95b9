"""Batching across frontends in a worker (workers.merge.LayerMerger): messages of one layer waiting together run as
one, each frontend gets exactly the rows it would have got alone, the oldest waiting message goes first, and nothing
waits for a frontend that sends nothing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.helpers import wait_until
from workers.merge import LayerMerger

D, E = 8, 4
torch.manual_seed(3)
EXPERTS = [torch.randn(D, D) for _ in range(E)]


def dense(layer: int, x, rows, experts, weights):
    """The reference: every assignment's weighted expert output, summed per row (layer l scales by l + 1)."""
    out = torch.zeros_like(x)
    for r, e, w in zip(rows.tolist(), experts.tolist(), weights.tolist(), strict=True):
        out[r] += w * (layer + 1) * (x[r] @ EXPERTS[e].T)
    return out


def message(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    rows = torch.arange(n).repeat_interleave(2)  # [2N]: two experts per row
    experts = torch.randint(0, E, (2 * n,), generator=g)
    order = torch.argsort(experts, stable=True)
    return x, rows[order], experts[order], torch.rand(2 * n, generator=g)


class Gate:
    """A run that holds its first call until released, so that later messages queue behind it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[int, int]] = []  # (layer, rows of x) per run

    def __call__(self, layer, x, rows, experts, weights):
        self.calls.append((layer, x.shape[0]))
        if len(self.calls) == 1:
            self.release.wait(10)
        return dense(layer, x, rows, experts, weights)


def test_messages_of_a_layer_waiting_together_run_once_and_each_gets_its_own_rows():
    gate = Gate()
    merger = LayerMerger(gate)
    msgs = {"first": (0, message(3, 1)), "a": (1, message(2, 2)), "b": (1, message(5, 3)), "c": (2, message(4, 4))}
    got: dict[str, torch.Tensor] = {}
    threads = []
    for name in ("first", "a", "b", "c"):  # queued in this order behind the held first run
        layer, m = msgs[name]
        t = threading.Thread(target=lambda n=name, lay=layer, mm=m: got.__setitem__(n, merger.submit(lay, *mm)))
        t.start()
        threads.append(t)
        if name == "first":
            wait_until(lambda: gate.calls, "the first message never ran")
        else:  # queued one after the other, in this order
            queued = len(threads) - 1
            wait_until(lambda q=queued: merger.waiting() == q, f"message {name} never queued")
    gate.release.set()
    for t in threads:
        t.join(10)
    merger.close()
    for name, (layer, m) in msgs.items():
        torch.testing.assert_close(got[name], dense(layer, *m), rtol=1e-5, atol=1e-5)
    # the held run, then a and b of layer 1 together (the oldest waiting), then c
    assert gate.calls == [(0, 3), (1, 7), (2, 4)]
    s = merger.stats
    assert (s.runs, s.messages, s.merged_runs) == (3, 4, 1)
    assert s.rows == sum(m[1].numel() for _, m in msgs.values())


def test_a_lone_message_runs_at_once_and_errors_reach_the_sender():
    merger = LayerMerger(dense)
    x, rows, experts, weights = message(2, 9)
    torch.testing.assert_close(merger.submit(5, x, rows, experts, weights), dense(5, x, rows, experts, weights))

    def broken(*args):
        raise ValueError("expert bug")

    bad = LayerMerger(broken)
    try:
        bad.submit(0, x, rows, experts, weights)
    except ValueError as e:
        assert str(e) == "expert bug"
    else:
        raise AssertionError("the error did not reach the sender")
    assert merger.stats.merged_runs == 0 and merger.stats.runs == 1
    merger.close()
    bad.close()


def test_the_gather_window_waits_for_a_frontend_one_layer_behind_and_not_for_an_idle_one():
    """B learns a pace (reply -> next layer in about 0.5 s). A's layer 2 then waits for B's layer 2, which
    comes well within 0.75 s of B's layer 1 being answered: one run of both. Later, B stops (no work, or dead):
    A's next layer waits no longer than B's usual gap, and a sender whose last layer is unanswered is never
    waited for."""
    merger = LayerMerger(dense, min_window_s=5.0)  # the cap out of the way: the expected gap alone bounds the wait
    msgs = [message(2, 20 + i) for i in range(6)]
    merger.submit(0, *msgs[0], sender="B")
    time.sleep(0.5)
    merger.submit(1, *msgs[1], sender="B")  # B's gap: ~0.5 s
    got: dict[str, torch.Tensor] = {}
    a = threading.Thread(target=lambda: got.__setitem__("A", merger.submit(2, *msgs[2], sender="A")))
    a.start()
    wait_until(lambda: merger.stats.waits == 1, "A's run did not wait for B", interval_s=0.005)
    got["B"] = merger.submit(2, *msgs[3], sender="B")
    a.join(10)
    torch.testing.assert_close(got["A"], dense(2, *msgs[2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["B"], dense(2, *msgs[3]), rtol=1e-5, atol=1e-5)
    s = merger.stats
    assert (s.runs, s.merged_runs, s.wait_hits) == (3, 1, 1)
    # B sends nothing more: A's layer 3 waits at most until B's layer 3 is overdue (1.5 gaps), then runs alone
    torch.testing.assert_close(merger.submit(3, *msgs[4], sender="A"), dense(3, *msgs[4]), rtol=1e-5, atol=1e-5)
    assert merger.stats.waits == 2 and merger.stats.wait_hits == 1
    merger.close()
    plain = LayerMerger(dense)
    plain.submit(0, *msgs[5], sender="C")  # C's only layer: never answered before, nobody expected
    assert plain.stats.waits == 0
    plain.close()


def test_the_gather_window_waits_across_a_step_boundary():
    """B's layer 1 was its step's last, and B learned a pace from a reply to its step's last layer to its next
    step's layer 0 (~0.5 s). A's layer 0 of a new step then waits for B's layer 0 (a frontend whose last layer was
    answered is expected at layer 0 of its next step, within that step gap): one run of both."""
    merger = LayerMerger(dense, min_window_s=5.0)  # the cap out of the way: A has no pace of its own yet
    msgs = [message(2, 40 + i) for i in range(6)]
    merger.submit(0, *msgs[0], sender="B")
    merger.submit(1, *msgs[1], sender="B")
    time.sleep(0.5)
    merger.submit(0, *msgs[2], sender="B")  # a new step: B's step gap ~0.5 s
    merger.submit(1, *msgs[3], sender="B")
    got: dict[str, torch.Tensor] = {}
    a = threading.Thread(target=lambda: got.__setitem__("A", merger.submit(0, *msgs[4], sender="A")))
    a.start()
    wait_until(lambda: merger.stats.waits == 1, "A's layer 0 did not wait for B's next step", interval_s=0.005)
    got["B"] = merger.submit(0, *msgs[5], sender="B")
    a.join(10)
    torch.testing.assert_close(got["A"], dense(0, *msgs[4]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["B"], dense(0, *msgs[5]), rtol=1e-5, atol=1e-5)
    assert (merger.stats.merged_runs, merger.stats.wait_hits) == (1, 1)
    merger.close()


def test_the_window_is_bounded_by_the_waiting_frontends_own_gap():
    """A run waits at most one of its own frontend's gaps before that layer (its attention pass; at a step boundary
    its step gap), at least min_window_s, counted from when the wait starts."""
    from workers.merge import _Message, _Sender

    merger = LayerMerger(dense, min_window_s=0.002)
    merger._senders["A"] = _Sender(layer=1, sent_at=1.0, replied_at=2.0, gap_s=0.05, step_gap_s=0.3)
    x, rows, experts, weights = message(1, 50)
    assert merger._limit(2, [_Message(2, x, rows, experts, weights, "A")], 10.0) == pytest.approx(10.05)
    assert merger._limit(0, [_Message(0, x, rows, experts, weights, "A")], 10.0) == pytest.approx(10.3)
    assert merger._limit(2, [_Message(2, x, rows, experts, weights, None)], 10.0) == pytest.approx(10.002)
    merger.close()
