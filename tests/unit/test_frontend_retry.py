"""The ingress's frontend client (``cluster.serve.ingress.streams.FrontendClient``) against a fake Serve handle: a
request whose frontend replica vanished before its first token is sent again (once) and streams from another
replica; one that had produced a token, or whose frontend raised, fails as before."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from cluster.engine.request import RequestOutput
from cluster.engine.sampling import SamplingParams
from cluster.errors import UnavailableError
from cluster.serve.ingress.metrics import ServeMetrics
from cluster.serve.ingress.streams import FrontendClient
from cluster.serve.stream_items import Accepted

PROMPT = [1, 2, 3]


def output(tokens: list[int], *, finished: bool) -> RequestOutput:
    return RequestOutput(
        request_id="r", prompt_token_ids=PROMPT, token_ids=tokens, text="x" * len(tokens), new_token_ids=tokens[-1:],
        delta_text="x", finished=finished, finish_reason="length" if finished else None,
    )  # fmt: skip


class FakeStream:
    """A ``DeploymentResponseGenerator``: the replica's items, then ``die`` (the replica vanishes) if given."""

    def __init__(self, items: list, die: bool) -> None:
        self.items, self.die, self.cancelled = list(items), die, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.items:
            return self.items.pop(0)
        if self.die:
            raise ActorDiedError()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Replica ``a`` accepts, streams ``a_tokens`` and dies; replica ``b`` streams the whole answer."""

    def __init__(self, a_tokens: int) -> None:
        self.a_tokens, self.calls = a_tokens, []
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, prompt, params, request_id):
        self.calls.append(request_id)
        if len(self.calls) == 1:
            items = [Accepted("app#Frontend#a")] + [output([7] * (i + 1), finished=False) for i in range(self.a_tokens)]
            return FakeStream(items, die=True)
        items = [Accepted("app#Frontend#b"), output([7, 8], finished=False), output([7, 8, 9], finished=True)]
        return FakeStream(items, die=False)

    @property
    def abort(self):
        return self

    @property
    def model_info(self):
        return self


async def collect(client: FrontendClient) -> list[RequestOutput]:
    client._info = {"max_model_len": 64, "vocab_size": 100}
    choices = await client.submit_all([PROMPT], SamplingParams(max_tokens=3), "req")
    return [out async for _, out in client.merged(choices, asyncio.get_running_loop().time())]


def test_a_request_whose_frontend_vanished_before_its_first_token_runs_on_another():
    metrics = ServeMetrics("m", max_num_seqs=4)
    handle = FakeHandle(a_tokens=0)
    client = FrontendClient(handle, timeout_s=30, metrics=metrics)
    outs = asyncio.run(collect(client))
    assert handle.calls == ["req-0", "req-0"]
    assert outs[-1].token_ids == [7, 8, 9] and outs[-1].finished
    accepted = {s.labels["engine"]: s.value for m in metrics.registry.collect() for s in m.samples
                if s.name == "mixserve:frontend_requests_total"}  # fmt: skip
    assert accepted == {"a": 1.0, "b": 1.0}


def test_a_request_that_had_streamed_a_token_fails_when_its_frontend_vanishes():
    client = FrontendClient(FakeHandle(a_tokens=1), timeout_s=30, metrics=ServeMetrics("m", max_num_seqs=4))
    with pytest.raises(UnavailableError):
        asyncio.run(collect(client))
