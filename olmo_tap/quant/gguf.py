"""A GGUF file's quantized tensors, kept quantized: each supported block type mapped exactly onto a storage scheme.

| GGUF type | block | storage | scale, minimum per group |
|---|---|---|---|
| Q4_0 | 32: d, 16 bytes of 4-bit codes | int4, group 32 | d, -8 d |
| Q4_1 | 32: d, m, 16 bytes | int4, group 32 | d, m |
| Q4_K | 256: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes | int4, group 32 | d * sc_j, -dmin * m_j |
| Q8_0 | 32: d, 32 int8 codes | int8, group 32 | d |
| Q6_K | 256: 6-bit codes, 16 int8 scales, d | int8 (codes - 32), group 16 | d * sc_j |

The per-group scale and minimum are read from the block headers; the codes are recovered from the ``gguf``
package's own dequantization (which fixes the bit layout) as round((value - minimum) / scale), and every weight
is then checked: code * scale + minimum must give the package's value bit for bit, or the load fails. So the
quantized weight holds exactly the values transformers and ``gguf`` decode, at the file's own precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from olmo_tap.quant.weights import INT4_GROUP, ROWS_PER_CHUNK, QuantizedWeight, pack_int4
from olmo_tap.weights.errors import WeightsError

KEPT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K")
_BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _scales(type_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-group (scale, minimum or None, group size) of ``blocks`` (n_blocks, block bytes), groups in order."""
    if type_name == "Q4_0":
        d = _fp16(blocks, 0)
        return d, -8.0 * d, 32
    if type_name == "Q4_1":
        return _fp16(blocks, 0), _fp16(blocks, 2), 32
    if type_name == "Q8_0":
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


def quantized_from_gguf(tensor: Any, source: str) -> QuantizedWeight:
    """The quantized weight (out, in) of a GGUF tensor of a type in ``KEPT_TYPES``, values exactly the file's."""
    type_name = tensor.tensor_type.name
    if type_name not in KEPT_TYPES:
        raise WeightsError(
            f"{source}: {tensor.name} is {type_name}, which olmo-tap cannot keep quantized (kept: "
            f"{', '.join(KEPT_TYPES)}); load it with --quantize int8 or int4 to requantize, or without --quantize"
        )
    out, n_in = (int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
    per_block, nbytes = _BLOCK[type_name]
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(out, (n_in // per_block) * nbytes)
    chunks = [
        _codes_of_rows(raw[start : start + ROWS_PER_CHUNK], tensor, type_name, source)
        for start in range(0, out, ROWS_PER_CHUNK)
    ]
    codes, scale = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    if chunks[0][2] is None:
        return QuantizedWeight("int8", codes, scale, None, chunks[0][3], type_name)
    minimum = torch.cat([c[2] for c in chunks])  # type: ignore[misc]
    assert chunks[0][3] == INT4_GROUP and per_block % INT4_GROUP == 0
    return QuantizedWeight("int4", pack_int4(codes), scale, minimum, INT4_GROUP, type_name)


def _codes_of_rows(
    raw: np.ndarray, tensor: Any, type_name: str, source: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(codes, scale, minimum or None, group) of some rows of ``tensor`` given as their raw block bytes."""
    from gguf.quants import dequantize

    rows = raw.shape[0]
    values = np.asarray(dequantize(raw, tensor.tensor_type), dtype=np.float32).reshape(rows, -1)
    scale, minimum, group = _scales(type_name, raw.reshape(-1, _BLOCK[type_name][1]))
    scale = scale.reshape(rows, -1)
    grouped = values.reshape(rows, -1, group)
    shifted = grouped if minimum is None else grouped - minimum.reshape(rows, -1)[..., None]
    safe = np.where(scale == 0, np.float32(1), scale)[..., None]
    codes = np.where(scale[..., None] == 0, 0, np.rint(shifted / safe))
    rebuilt = codes.astype(np.float32) * scale[..., None]
    if minimum is not None:
        rebuilt = rebuilt + minimum.reshape(rows, -1)[..., None]
    if not np.array_equal(rebuilt, grouped):
        bad = int(np.count_nonzero(rebuilt != grouped))
        raise WeightsError(f"{source}: {tensor.name} ({type_name}) does not map exactly onto codes ({bad} values)")
    scale_t = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
    if minimum is None:
        return torch.from_numpy(codes.reshape(rows, -1).astype(np.int8)), scale_t, None, group
    minimum_t = torch.from_numpy(np.ascontiguousarray(minimum.reshape(rows, -1), dtype=np.float32))
    return torch.from_numpy(codes.reshape(rows, -1).astype(np.uint8)), scale_t, minimum_t, group
