"""GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ, GEMM): the tensors one quantized linear stores, and the
:class:`IntWeight` they make. Both store the weight transposed ([K, N], as ``x @ W``), in int32 words whose element i
sits in bits [i b, (i + 1) b), the low bits first.

Letters: N output features, K input features, b bits (4 or 8), G group size, Ng = K / G groups (1 per channel).

    GPTQ  qweight int32 [K b / 32, N]  packed down the input features: word [i, n] holds k = i 32/b .. + 32/b - 1
          qzeros  int32 [Ng, N b / 32]  packed along the outputs; the v1 format (``checkpoint_format: gptq``,
                  what AutoGPTQ writes) stores zero - 1, v2 the zero itself
          scales  float16 [Ng, N]; g_idx int32 [K]: the group of each input feature (k // G, or any order with
                  ``desc_act``, each group still of G features)
          w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]
    AWQ   qweight int32 [K, N / 8]      packed along the outputs, 8 per word in the order 0 2 4 6 1 3 5 7
          qzeros  int32 [Ng, N / 8]     the same order; scales float16 [Ng, N]
          w[n, k] = (q[k, n] - zero[k // G, n]) * scales[k // G, n]
"""

from __future__ import annotations

import torch

from cluster.checkpoint.quant.parts import FLOATS, INTS, Part, groups_of
from cluster.checkpoint.quant.weights import IntWeight, from_values, unpack_words
from cluster.config.quantization import WeightScheme
from cluster.errors import CheckpointError

# Where AutoAWQ puts output n (of each 8) within a word: bits [4 i, 4 i + 4) hold output ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # word position of output j


def parts(scheme: WeightScheme, n: int, k: int, *, module: str) -> dict[str, Part]:
    b, ng = scheme.num_bits, groups_of(scheme, k, module=module)
    per_word = 32 // b
    if scheme.format == "awq":
        if n % per_word:
            raise CheckpointError(f"{module}: {n} output features do not pack 8 to a word (AWQ)")
        return {
            "qweight": Part(((k, n // per_word),), (torch.int32,)),
            "qzeros": Part(((ng, n // per_word),), (torch.int32,)),
            "scales": Part(((ng, n),), FLOATS),
        }
    if k % per_word:
        raise CheckpointError(f"{module}: {k} input features do not pack {per_word} to a word (GPTQ)")
    return {
        "qweight": Part(((k // per_word, n),), (torch.int32,)),
        "qzeros": Part(((ng, -(-n // per_word)),), (torch.int32,)),
        "scales": Part(((ng, n),), FLOATS),
        "g_idx": Part(((k,),), INTS),
    }


def assemble(scheme: WeightScheme, t: dict[str, torch.Tensor], n: int, k: int, *, where: str) -> IntWeight:
    b = scheme.num_bits
    scale = t["scales"].float().t()  # [N, Ng]
    if scheme.format == "awq":
        reverse = list(AWQ_REVERSE)
        values = unpack_words(t["qweight"], b).view(k, n // 8, 8)[:, :, reverse].reshape(k, n).t()
        zero = unpack_words(t["qzeros"], b).view(-1, n // 8, 8)[:, :, reverse].reshape(-1, n).t().float()
        return from_values(values.contiguous(), bits=b, scale=scale, zero=zero.contiguous(), where=where)
    values = unpack_words(t["qweight"].t().contiguous(), b)  # [N, K]
    zero = unpack_words(t["qzeros"], b)[:, :n].t().float() + scheme.zero_offset  # [N, Ng]
    return from_values(values, bits=b, scale=scale, zero=zero.contiguous(), g_idx=t["g_idx"], where=where)
