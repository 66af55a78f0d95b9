"""How a layer's messages reach the experts and how the partial outputs come back.

The frontend only sees :class:`ExpertClient`: ``run_layer(layer, x, messages) -> partials``. Implementations:

- :class:`LocalExperts`: in-process, no Ray (W = 0; the reference path).
- :class:`RayExperts`: one actor call per worker with rows, issued concurrently, over ordinary object refs.
- :class:`RdtExperts` (``router.rdt``): the same over Ray Direct Transport (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

from typing import Protocol

import torch

from router.dispatch import WorkerMessage
from workers.expert import ExpertShard


class ExpertClient(Protocol):
    def run_layer(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        """x [T, D] the normalised hidden states; returns one [N_w, D] partial per message, in order."""
        ...


class LocalExperts:
    """All messages served in-process by shards indexed by worker id."""

    def __init__(self, shards: dict[int, ExpertShard]) -> None:
        self.shards = shards

    def run_layer(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        return [self.shards[m.worker].run(layer, x[m.tokens], m.rows, m.experts, m.weights) for m in messages]


TRANSPORTS = ("object_ref", "gloo", "nccl")

# Tensors cross object refs as NumPy arrays: pickling a torch tensor costs ~100 us, a NumPy array ~1 us, and Ray
# passes NumPy buffers out of band. NumPy has no bfloat16, so those travel as int16 bit patterns.
_BITCAST = {torch.bfloat16: torch.int16}


def to_wire(t: torch.Tensor) -> tuple:
    """A CPU tensor as (numpy array, dtype name) for an object ref."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in _BITCAST:
        return t.contiguous().view(_BITCAST[t.dtype]).numpy(), str(t.dtype)
    return t.contiguous().numpy(), ""


def from_wire(w: tuple, device: torch.device | str = "cpu") -> torch.Tensor:
    arr, bitcast = w
    t = torch.from_numpy(arr)
    if bitcast:
        t = t.view(getattr(torch, bitcast.removeprefix("torch.")))
    return t.to(device) if str(device) != "cpu" else t


class RayExperts:
    """One actor call per worker that has rows, all issued before any is awaited; tensors travel as object refs.

    A worker that died or does not answer within ``timeout_s`` turns into :class:`ExpertWorkerError` naming it,
    so the requests of that step fail fast instead of hanging.
    """

    def __init__(self, handles: list, *, timeout_s: float = 60.0) -> None:
        self.handles = handles
        self.timeout_s = timeout_s

    def run_layer(self, layer: int, x: torch.Tensor, messages: list[WorkerMessage]) -> list[torch.Tensor]:
        refs = [self.handles[m.worker].run.remote(layer, x[m.tokens], m.rows, m.experts, m.weights) for m in messages]
        return self._gather(refs, messages, layer)

    def _gather(self, refs: list, messages: list[WorkerMessage], layer: int) -> list[torch.Tensor]:
        import time

        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        from cluster.errors import ExpertWorkerError

        deadline = time.monotonic() + self.timeout_s
        out = []
        for ref, m in zip(refs, messages, strict=True):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except GetTimeoutError:
                for r in refs:
                    ray.cancel(r)
                raise ExpertWorkerError(
                    f"expert worker {m.worker} did not answer layer {layer} within {self.timeout_s:.0f}s"
                ) from None
            except RayActorError as e:
                raise ExpertWorkerError(
                    f"expert worker {m.worker} is unavailable (it died or is restarting): {type(e).__name__}"
                ) from None
            except RayTaskError as e:
                raise ExpertWorkerError(f"expert worker {m.worker} failed on layer {layer}: {e.cause!r}") from None
        return out
