"""Routed experts in responses (``return_routed_experts``, or the server's ``enable_return_routed_experts``): which
experts of every layer each token was sent to, [tokens, layers, top_k] with tokens = prompt + generated - 1
(``cluster.engine.routed``), encoded as SGLang encodes them: the flattened array as little-endian int32 bytes.

HTTP: each choice gets ``routed_experts`` (those bytes in base64) and ``routed_experts_shape``; a streamed choice
gets them on its final chunk. gRPC: the bytes as they are (:func:`routed_bytes`) and the shape.

Example: 2 prompt tokens, 2 generated, 1 layer, top 2 -> shape [3, 1, 2]; rows [[0, 3]], [[1, 3]], [[2, 0]] are the
24 bytes 00000000 03000000 01000000 ..., base64 ``AAAAAAMAAAABAAAAAwAAAAIAAAAAAAAA``.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from cluster.engine.request import RequestOutput


def routed_bytes(routed: np.ndarray) -> bytes:
    """The array [N, L, K] flattened, as little-endian int32."""
    return np.ascontiguousarray(routed, dtype="<i4").tobytes()


def routed_fields(out: RequestOutput) -> dict[str, Any]:
    """A finished output's routed experts as a response choice's fields; none when it has none."""
    if out.routed_experts is None:
        return {}
    return {
        "routed_experts": base64.b64encode(routed_bytes(out.routed_experts)).decode("ascii"),
        "routed_experts_shape": [int(d) for d in out.routed_experts.shape],
    }
