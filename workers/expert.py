"""Expert math: a set of SwiGLU experts and how one message of routed rows runs through them. No Ray here;
the actor that serves a shard is :class:`workers.expert_worker.ExpertWorker`.

Shapes: N distinct tokens in a message, A (token, expert) assignments, D hidden, F intermediate.

Quantized experts (a quantized checkpoint, or ``quantization=`` on a dense one) stay quantized in memory, each
expert run by the kernel that suits its rows (``workers.quant``); dense experts run in grouped matmuls, or expert by
expert through ``workers.dense`` where that runs bfloat16 on the fused CPU kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.checkpoint.expert_weights import ExpertWeights, expert_weights
from cluster.checkpoint.load import LoadRole, load_tensors, parse_dtype
from cluster.config.model import ModelConfig
from cluster.config.quantization import OnLoad
from cluster.errors import CheckpointError
from workers import dense
from workers.quant.experts import QuantExpert, QuantExperts

# torch's grouped GEMM: a private API (the one transformers v5 uses for MoE experts); None where torch lacks it
GROUPED_MM = getattr(torch, "_grouped_mm", None)


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype (it needs recent torch; on CUDA, bf16 and a
    Hopper-class GPU). Tried once on tiny inputs."""
    key = (device.type, dtype)
    if GROUPED_MM is None:
        return False
    if key not in _GROUPED_OK:
        try:
            x = torch.ones(2, 8, device=device, dtype=dtype)
            w = torch.ones(2, 8, 8, device=device, dtype=dtype)
            GROUPED_MM(x, w, offs=torch.tensor([1, 2], device=device, dtype=torch.int32))
            _GROUPED_OK[key] = True
        except (AttributeError, RuntimeError, NotImplementedError):
            _GROUPED_OK[key] = False
    return _GROUPED_OK[key]


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def release_freed_memory() -> None:
    """Give the heap memory that loading freed back to the OS (glibc keeps freed blocks of a few MiB, the size of
    one expert's transients, in its arenas: measured 1.3 GB held after quantizing 64 experts of 3 x 512 x 1792 on
    load, 0 after this). ``malloc_trim``; nothing where the C library has none."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ExpertShard:
    """A set of (layer, expert) SwiGLU experts. Per layer the shard's experts are stacked: w13 [E_l, 2F, D]
    (w1 and w3 fused) and w2 [E_l, D, F], so one message runs through all of them in two grouped matmuls."""

    def __init__(
        self,
        weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        *,
        num_experts: int | None = None,
    ) -> None:
        """``weights``: (layer, expert) -> (w1, w2, w3). It is emptied as the stacks fill, so memory never holds
        more than the shard plus one expert. ``num_experts``: the model's experts per layer, when known; a layer
        whose experts are all here then takes the router's ids as they are (see ``_LayerExperts.local_index``)."""
        self._layers: dict[int, _LayerExperts] = {}
        for layer in sorted({layer for layer, _ in weights}):
            ids = sorted(e for lay, e in weights if lay == layer)
            w1, w2, _ = weights[(layer, ids[0])]
            f, d = w1.shape
            w13s = torch.empty(len(ids), 2 * f, d, dtype=w1.dtype, device=w1.device)
            w2s = torch.empty(len(ids), *w2.shape, dtype=w2.dtype, device=w2.device)
            for i, e in enumerate(ids):
                w1, w2, w3 = weights.pop((layer, e))
                w13s[i, :f], w13s[i, f:], w2s[i] = w1, w3, w2
            complete = num_experts is not None and ids == list(range(num_experts))
            self._layers[layer] = _LayerExperts(ids, w13s, w2s, complete=complete)

    @classmethod
    def quantized(cls, layers: dict[int, dict[int, QuantExpert]], *, num_experts: int | None = None) -> ExpertShard:
        """A shard of quantized experts: layer -> expert id -> :class:`QuantExpert`."""
        shard = cls({}, num_experts=num_experts)
        for layer, experts in sorted(layers.items()):
            ids = sorted(experts)
            complete = num_experts is not None and ids == list(range(num_experts))
            shard._layers[layer] = _LayerExperts(ids, quant=QuantExperts([experts[e] for e in ids]), complete=complete)
        return shard

    @classmethod
    def load(
        cls,
        folder: str | Path,
        config: ModelConfig,
        experts: Iterable[tuple[int, int]],
        *,
        dtype: str | torch.dtype = "float32",
        device: torch.device | str = "cpu",
        progress: bool = True,
        label: str = "experts",
        quantization: OnLoad | None = None,
    ) -> ExpertShard:
        """Read ONLY the given experts' tensors from the checkpoint. Quantized ones (the checkpoint's own, or
        ``quantization`` of a dense checkpoint) stay quantized, one expert at a time made ready for ``device``."""
        pairs = sorted(set(experts))
        if config.quantization is not None or quantization is not None:
            weights = expert_weights(folder, config, pairs, quantization=quantization, progress=progress, label=label)
            shard = cls._from_stored(weights, torch.device(device), parse_dtype(dtype), config.num_experts)
            release_freed_memory()
            return shard
        tensors = load_tensors(
            folder, config, role=LoadRole.expert_shard(pairs), dtype=parse_dtype(dtype), progress=progress, label=label
        )
        weights = {}
        for layer, e in pairs:
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            weights[(layer, e)] = tuple(tensors.pop(p + w + ".weight").to(device) for w in ("w1", "w2", "w3"))
        return cls(weights, num_experts=config.num_experts)

    @classmethod
    def _from_stored(
        cls, weights: Iterable[tuple[tuple[int, int], ExpertWeights]], device: torch.device, dtype: torch.dtype, n: int
    ) -> ExpertShard:
        """Quantized experts as they come (each made ready for the device at once); dense ones, which a quantized
        checkpoint may leave its experts, stacked as usual. Not both."""
        quant: dict[int, dict[int, QuantExpert]] = {}
        dense: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for (layer, e), (w1, w2, w3) in weights:
            if isinstance(w1, torch.Tensor) and isinstance(w2, torch.Tensor) and isinstance(w3, torch.Tensor):
                dense[(layer, e)] = tuple(w.to(device=device, dtype=dtype) for w in (w1, w2, w3))  # type: ignore[assignment]
            elif (
                not isinstance(w1, torch.Tensor)
                and not isinstance(w2, torch.Tensor)
                and not isinstance(w3, torch.Tensor)
            ):
                quant.setdefault(layer, {})[e] = QuantExpert(w1, w2, w3, device=device, dtype=dtype)
            else:
                raise CheckpointError(f"expert {e} of layer {layer}: w1, w2 and w3 are not all quantized, or all dense")
        if quant and dense:
            raise CheckpointError("the checkpoint stores some experts quantized and others dense; not supported")
        return cls(dense, num_experts=n) if dense else cls.quantized(quant, num_experts=n)

    @property
    def experts(self) -> list[tuple[int, int]]:
        return sorted((layer, e) for layer, le in self._layers.items() for e in le.ids)

    def nbytes(self) -> int:
        """Bytes of the experts as held (quantized ones in their stored form, scales included)."""
        return sum(le.nbytes() for le in self._layers.values())

    def describe(self) -> str:
        """How the experts are held and run: ``int4 g128: _weight_int4pack_mm_for_cpu`` (quantized), or the dtype
        (dense)."""
        kinds = {k for le in self._layers.values() for k in le.describe()}
        return "; ".join(sorted(kinds)) or "none"

    def kernels(self, rows: int) -> set[str]:
        """What a message of ``rows`` rows per expert runs on: kernel names; dense experts: ``grouped matmul``, or the
        fused CPU kernel's name where ``workers.dense`` runs bfloat16 on it."""
        return {k for le in self._layers.values() for k in le.kernels(rows)}

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        rows: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of this shard's experts for each token.

        x [N, D]; rows/experts/weights [A] (experts sorted ascending). Returns [N, D] in x's dtype: for token n,
        sum over its assignments of ``weight * expert(x[n])``. Dense experts: see :func:`_dense_experts`.

        Example: experts [0, 0, 3], rows [0, 2, 1] -> expert 0 on x[0] and x[2], expert 3 on x[1].
        """
        out = torch.zeros_like(x)
        if experts.numel() == 0:
            return out
        le = self._layers.get(layer)
        local = le.local_index(experts) if le is not None else None
        if le is None or local is None:
            raise KeyError(f"experts {sorted(set(experts.tolist()))} of layer {layer} are not all held by this shard")
        xa = x[rows]  # [A, D], grouped by expert
        y = le.quant.run(xa, local) if le.quant is not None else _dense_experts(le, xa, local)
        # A token's assignments go to the same row of out: index_put_ with accumulate sums them (index_add_ stalls
        # in an OpenMP region when the cores are busy: measured 5 us idle, 28 ms contended)
        out.index_put_((rows,), (y * weights[:, None].to(y.device)).to(out.dtype), accumulate=True)
        return out


def _dense_experts(le: _LayerExperts, xa: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """xa [A, D] through dense experts, row a through expert ``local[a]`` (positions in ``le``, sorted) -> [A, D]:
    one grouped matmul per projection, else a loop over the experts (no grouped matmul here, or bfloat16 on a CPU
    where ``workers.dense`` runs the fused kernel for each expert's rows)."""
    counts = torch.bincount(local, minlength=len(le.ids))  # [E_l]
    fused = xa.device.type == "cpu" and dense.fused_kernel(le.w13, int(counts.max()), xa.dtype) is not None
    if GROUPED_MM is not None and not fused and grouped_mm_works(xa.device, xa.dtype):
        ends = torch.cumsum(counts, 0).to(torch.int32)  # [E_l]
        gate, up = GROUPED_MM(xa, le.w13.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return GROUPED_MM(F.silu(gate) * up, le.w2.transpose(1, 2), offs=ends)  # [A, D]
    parts, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c:
            gate, up = dense.linear(xa[start : start + c], le.w13[e]).chunk(2, dim=-1)
            parts.append(dense.linear(F.silu(gate) * up, le.w2[e]))
            start += c
    return torch.cat(parts)


class _LayerExperts:
    """One layer's experts of a shard: ids (sorted) and either w13 [E_l, 2F, D] and w2 [E_l, D, F] (dense) or
    ``quant`` (quantized experts, one per id)."""

    def __init__(
        self,
        ids: list[int],
        w13: torch.Tensor | None = None,
        w2: torch.Tensor | None = None,
        *,
        quant: QuantExperts | None = None,
        complete: bool = False,
    ) -> None:
        self.ids = ids
        self.w13 = w13 if w13 is not None else torch.empty(0)
        self.w2 = w2 if w2 is not None else torch.empty(0)
        self.quant = quant
        self._local = torch.full((max(ids) + 1,), -1, dtype=torch.int64)
        self._local[torch.tensor(ids)] = torch.arange(len(ids))
        self.complete = complete  # every expert of the layer, ids 0..E-1: an id is its own position

    def nbytes(self) -> int:
        if self.quant is not None:
            return self.quant.nbytes()
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2))

    def kernels(self, rows: int) -> set[str]:
        if self.quant is not None:
            return self.quant.kernels(rows)
        fused = dense.fused_kernel(self.w13, rows, self.w13.dtype)
        return {"grouped matmul" if fused is None else fused.name}

    def describe(self) -> set[str]:
        return (
            self.quant.describe() if self.quant is not None else {f"dense {str(self.w13.dtype).removeprefix('torch.')}"}
        )

    def local_index(self, experts: torch.Tensor) -> torch.Tensor | None:
        """Expert ids [A] -> positions in this layer's stack [A]; None when one is not held. A complete layer holds
        every id the router can give: returned as they are, unchecked (on a GPU each check waits for the device)."""
        if self.complete:
            return experts
        if int(experts.max()) >= self._local.numel() or int(experts.min()) < 0:
            return None
        local = self._local.to(experts.device)[experts]
        return None if bool((local < 0).any()) else local
