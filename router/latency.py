"""How long a layer's exchange with the workers usually takes, and when a reply counts as late (:class:`Lateness`).

With copies of experts, a layer whose reply has not come within ``bound()`` is sent to the other copies and the late
reply is dropped (hedged dispatch, as in "The Tail at Scale"): a worker that is alive but stalled (a GC pause,
swapping, a frozen process) then costs one bound, not the stall. The bound comes from the exchanges this client has
measured, never a fixed constant: ``factor`` times a high quantile of the last ``window`` exchanges, at least
``floor_s``; until ``min_samples`` have been measured there is none (the worker timeout alone applies).

Example: the last exchanges took 4-6 ms with a p99 of 6 ms -> bound max(0.05, 8 x 0.006) = 0.05 s.
"""

from __future__ import annotations

import collections
import threading


class Lateness:
    def __init__(
        self,
        *,
        window: int = 512,
        quantile: float = 0.99,
        factor: float = 8.0,
        floor_s: float = 0.05,
        min_samples: int = 32,
    ) -> None:
        self.quantile, self.factor, self.floor_s, self.min_samples = quantile, factor, floor_s, min_samples
        self._seconds: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self._bound: float | None = None
        self._since = 0  # samples since the bound was computed

    def record(self, seconds: float) -> None:
        """One exchange that finished in time (failed or hedged ones are not recorded)."""
        with self._lock:
            self._seconds.append(seconds)
            self._since += 1
            if self._since >= 16 or self._bound is None:  # recomputed now and then, not per layer
                self._bound = self._compute()
                self._since = 0

    def _compute(self) -> float | None:
        if len(self._seconds) < self.min_samples:
            return None
        ordered = sorted(self._seconds)
        q = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        return max(self.floor_s, self.factor * q)

    def bound(self) -> float | None:
        """Seconds after which a reply is late; None while too few exchanges have been measured."""
        return self._bound
