"""A GGUF file's quantized tensors, kept quantized: each supported block type mapped exactly onto a storage scheme.

| GGUF type | block | storage | scale, minimum per group |
|---|---|---|---|
| Q4_0 | 32: d, 16 bytes of 4-bit codes | int4, group 32 | d, -8 d |
| Q4_1 | 32: d, m, 16 bytes | int4, group 32 | d, m |
| Q4_K | 256: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes | int4, group 32 | d * sc_j, -dmin * m_j |
| Q5_0 | 32: d, 32 high bits, 16 bytes of low nibbles | int8 (codes - 16), group 32 | d |
| Q8_0 | 32: d, 32 int8 codes | int8, group 32 | d |
| Q6_K | 256: 6-bit codes, 16 int8 scales, d | int8 (codes - 32), group 16 | d * sc_j |

The per-group scale and minimum are read from the block headers and the codes straight from the block bits, in
ggml's layouts (``_codes``). An fp16 scale (11 significant bits), times a K-quant's 6-bit sub-scale, times a code
of at most 6 bits fits fp32's 24 bits, so every product is exact and adding the minimum rounds once, as in ggml:
the quantized weight holds exactly the values transformers and the ``gguf`` package decode, at the file's own
precision. The tests hold each type to the
package's own dequantization bit for bit (random blocks, and the embedded file). Until 2026-12-03 the codes were
recovered from that dequantization at every load and checked there: the same values, 3.5 s of a 16 s load.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from olmo_tap.quant import KEPT_GGUF_TYPES
from olmo_tap.quant.weights import INT4_GROUP, QuantizedWeight, pack_int4
from olmo_tap.weights.errors import WeightsError

# Q5_0 is what llama.cpp writes for a Q4_K_M file's tensors whose rows are no multiple of 256 (e.g. SmolLM2's 576)
_BLOCK = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _scales(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-group (scale, minimum or None, group size) of ``blocks`` (n_blocks, block bytes), groups in order."""
    if type_name == "Q4_0":
        d = _fp16(blocks, 0)
        return d, -8.0 * d, 32
    if type_name == "Q4_1":
        return _fp16(blocks, 0), _fp16(blocks, 2), 32
    if type_name in ("Q5_0", "Q8_0"):
        return _fp16(blocks, 0), None, 32
    if type_name == "Q4_K":
        from gguf.quants import Q4_K

        d, dmin = _fp16(blocks, 0), _fp16(blocks, 2)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        return (d[:, None] * sc.astype(np.float32)).ravel(), -(dmin[:, None] * m.astype(np.float32)).ravel(), 32
    if type_name == "Q6_K":
        d = _fp16(blocks, 208)
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        return (d[:, None] * sc).ravel(), None, 16
    raise AssertionError(type_name)


def _codes(type_name: str, blocks: np.ndarray) -> np.ndarray:
    """The codes of ``blocks`` (n_blocks, block bytes) in value order: uint8 in [0, 16) for the 4-bit types,
    int8 for Q5_0, Q8_0 and Q6_K (Q5_0's 5-bit code minus 16 and Q6_K's 6-bit code minus 32, as ggml subtracts
    them)."""
    if type_name in ("Q4_0", "Q4_1"):  # value j < 16: low nibble of byte j; value 16 + j: its high nibble
        qs = blocks[:, -16:]
        return np.concatenate((qs & 0xF, qs >> 4), axis=1)
    if type_name == "Q5_0":  # Q4_0's nibbles, and bit j of the little-endian 32-bit qh as value j's fifth bit
        qs = blocks[:, 6:]
        qh = blocks[:, 2:6].copy().view("<u4")
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return (np.concatenate((qs & 0xF, qs >> 4), axis=1) | (high << 4)).view(np.int8) - np.int8(16)
    if type_name == "Q8_0":
        return blocks[:, 2:].view(np.int8)
    if type_name == "Q4_K":  # four runs of 32 bytes: the low nibbles are group 2i, the high ones group 2i + 1
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        return np.concatenate((qs & 0xF, qs >> 4), axis=2).reshape(-1, 256)
    if type_name == "Q6_K":
        # each half of 128 values: 64 bytes of low nibbles (ql) and 32 of 2-bit pairs (qh); value 32 k + l takes
        # the (k // 2 ? high : low) nibble of ql[l + 32 (k % 2)] and bits 2k, 2k + 1 of qh[l]
        ql = blocks[:, :128].reshape(-1, 2, 1, 2, 32)
        low = np.concatenate((ql & 0xF, ql >> 4), axis=2).reshape(-1, 2, 4, 32)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        return ((low | (high << 4)).view(np.int8) - np.int8(32)).reshape(-1, 256)
    raise AssertionError(type_name)


def quantized_from_gguf(tensor: Any, source: str) -> QuantizedWeight:
    """The quantized weight (out, in) of a GGUF tensor of a type in ``KEPT_GGUF_TYPES``, values exactly the file's."""
    type_name = tensor.tensor_type.name
    if type_name not in KEPT_GGUF_TYPES:
        raise WeightsError(
            f"{source}: {tensor.name} is {type_name}, which olmo-tap cannot keep quantized (kept: "
            f"{', '.join(KEPT_GGUF_TYPES)}); load it with --quantize int8 or int4 to requantize, or without --quantize"
        )
    out, n_in = (int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
    per_block, nbytes = _BLOCK[type_name]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, nbytes)
    scale, minimum, group = _scales(type_name, blocks)
    codes = torch.from_numpy(np.ascontiguousarray(_codes(type_name, blocks)).reshape(out, n_in))
    scale_t = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(out, -1))
    if minimum is None:
        return QuantizedWeight("int8", codes, scale_t, None, group, type_name)
    minimum_t = torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(out, -1))
    assert group == INT4_GROUP and per_block % INT4_GROUP == 0
    return QuantizedWeight("int4", pack_int4(codes), scale_t, minimum_t, INT4_GROUP, type_name)
