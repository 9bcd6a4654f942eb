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

from pathlib import Path
from typing import Any

import numpy as np
import torch

from olmo_tap.quant.weights import INT4_GROUP, QuantizedWeight, pack_int4
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
    from gguf.quants import dequantize

    type_name = tensor.tensor_type.name
    if type_name not in KEPT_TYPES:
        raise WeightsError(
            f"{source}: {tensor.name} is {type_name}, which olmo-tap cannot keep quantized (kept: "
            f"{', '.join(KEPT_TYPES)}); load it with --quantize int8 or int4 to requantize, or without --quantize"
        )
    out, n_in = (int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
    per_block, nbytes = _BLOCK[type_name]
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, nbytes)
    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(out, n_in)
    scale, minimum, group = _scales(type_name, raw)
    scale, minimum_or_zero = scale.reshape(out, n_in // group), (0.0 if minimum is None else minimum.reshape(out, -1))
    grouped = values.reshape(out, n_in // group, group)
    shifted = grouped - np.asarray(minimum_or_zero, dtype=np.float32)[..., None] if minimum is not None else grouped
    safe = np.where(scale == 0, np.float32(1), scale)[..., None]
    codes = np.rint(shifted / safe)
    codes = np.where(scale[..., None] == 0, 0, codes)
    rebuilt = codes.astype(np.float32) * scale[..., None]
    if minimum is not None:
        rebuilt = rebuilt + np.asarray(minimum_or_zero, dtype=np.float32)[..., None]
    if not np.array_equal(rebuilt, grouped):
        bad = int(np.count_nonzero(rebuilt != grouped))
        raise WeightsError(f"{source}: {tensor.name} ({type_name}) does not map exactly onto codes ({bad} values)")
    scale_t = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
    if minimum is None:
        codes_t = torch.from_numpy(codes.reshape(out, n_in).astype(np.int8))
        return QuantizedWeight("int8", codes_t, scale_t, None, group, type_name)
    assert group == INT4_GROUP and per_block % INT4_GROUP == 0
    codes_t = torch.from_numpy(codes.reshape(out, n_in).astype(np.uint8))
    minimum_t = torch.from_numpy(np.ascontiguousarray(minimum_or_zero, dtype=np.float32))
    return QuantizedWeight("int4", pack_int4(codes_t), scale_t, minimum_t, INT4_GROUP, type_name)


def read_quantized_gguf(path: str | Path) -> dict[str, tuple[str, Any]]:
    """HF name -> (GGUF type name, the GGUF tensor) of every tensor of a llama GGUF file (the rows of q and k
    still in llama.cpp's rotary order: ``olmo_tap.quant.model`` restores HF's)."""
    from gguf import GGUFReader

    from olmo_tap.weights.gguf import gguf_to_hf_name

    try:
        reader = GGUFReader(Path(path).expanduser())
    except Exception as e:
        raise WeightsError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e
    found = {}
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        if name is not None:
            found[name] = (tensor.tensor_type.name, tensor)
    return found
