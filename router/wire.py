"""Wire format of the object-ref and channel transports: one layer's message to one worker as ONE flat byte buffer.

Ray's channels serialize a NumPy array as a single out-of-band buffer (one copy into shared memory, none out:
the reader gets a view); a tuple of arrays or a torch tensor costs 2-4x more per call (measured, see
``router.channel``), and over actor calls the packed array took half the time of five pickled tensors (see
``router.object_ref``). So a message is packed into one uint8 array, and the worker's reply is its output rows as
raw bytes. bf16/fp16 travel as 2 bytes per value, fp32 as 4; indices as int32.

Layout of a message (native byte order; every field 4-byte aligned)::

    header   int32[HEADER]  layer, N, A, D, dtype code, flags (ECHO: send the rows back without computing)
    x        N*D values of the dtype code's dtype, padded to a multiple of 4 bytes
    rows     int32[A]       index into the N rows for each assignment
    experts  int32[A]       expert id of each assignment (sorted ascending)
    weights  float32[A]     routing weight of each assignment

Reply: the partial output [N, D] in the same dtype, N*D values, no header. A worker with no rows in a layer
gets ``None`` and replies ``None``.

Shapes: T tokens in the step, N rows sent to this worker, A (row, expert) assignments, D hidden.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from router.dispatch import WorkerMessage

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEADER = 6
ECHO = 1


@dataclass(frozen=True)
class Message:
    """A message as the worker reads it: views into the received buffer (read-only: never written)."""

    layer: int
    x: torch.Tensor  # [N, D]
    rows: torch.Tensor  # [A] int64
    experts: torch.Tensor  # [A] int64
    weights: torch.Tensor  # [A] float32
    echo: bool


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


def pack(layer: int, x: torch.Tensor, m: WorkerMessage, *, echo: bool = False) -> np.ndarray:
    """The rows ``m.tokens`` of x [T, D] and m's assignments as one uint8 array (gathered straight into it)."""
    n, d, a = int(m.tokens.numel()), x.shape[1], int(m.rows.numel())
    size = x.element_size()
    xbytes = _pad4(n * d * size)
    buf = torch.empty(HEADER * 4 + xbytes + 12 * a, dtype=torch.uint8)
    raw = buf.numpy()
    raw[: HEADER * 4].view(np.int32)[:] = (layer, n, a, d, DTYPES.index(x.dtype), ECHO if echo else 0)
    o = HEADER * 4
    rows_out = buf[o : o + n * d * size].view(x.dtype).view(n, d)
    if x.device.type == "cpu":
        torch.index_select(x, 0, m.tokens, out=rows_out)
    else:
        rows_out.copy_(x[m.tokens.to(x.device)])
    o += xbytes
    for t, kind in ((m.rows, np.int32), (m.experts, np.int32), (m.weights, np.float32)):
        raw[o : o + 4 * a].view(kind)[:] = t.cpu().numpy()
        o += 4 * a
    return raw


def _tensor(buf: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over a received (read-only) buffer, without a copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(buf)


def unpack(buf: np.ndarray) -> Message:
    """Inverse of :func:`pack` (the worker's side)."""
    layer, n, a, d, code, flags = buf[: HEADER * 4].view(np.int32).tolist()
    dtype = DTYPES[code]
    size = dtype.itemsize
    t = _tensor(buf)
    o = HEADER * 4
    x = t[o : o + n * d * size].view(dtype).view(n, d)
    o += _pad4(n * d * size)
    index = torch.from_numpy(buf[o : o + 8 * a].view(np.int32).astype(np.int64))  # [2A]: rows, experts
    weights = t[o + 8 * a : o + 12 * a].view(torch.float32)
    return Message(layer, x, index[:a], index[a:], weights, echo=bool(flags & ECHO))


def pack_rows(y: torch.Tensor) -> np.ndarray:
    """A reply: y [N, D] as raw bytes (moved to the CPU first when it is not there)."""
    return y.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()


def unpack_rows(buf: np.ndarray, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: [N, D] of ``dtype``, a view of the received buffer (read-only)."""
    return _tensor(buf).view(dtype).view(n, d)
