"""A GGUF file's header, its metadata and tensor directory, read in milliseconds.

The ``gguf`` package's ``GGUFReader`` builds numpy views for every item of every metadata array. On the embedded
SmolLM2 file, whose tokenizer arrays hold 98k strings, that takes ~5 s per load, while a loader needs a dozen
numbers and the tensor directory. This module reads the same header (GGUF versions 2 and 3, little-endian, as the
reader supports) with ``struct``. It takes its constants (value types, quantization types, block sizes, the byte
shape of a quantized tensor) from the ``gguf`` package and skips string arrays without decoding them. The tests
hold it to ``GGUFReader`` on the embedded file and on files written with ``gguf``'s own writer.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from olmo_tap.weights.errors import WeightsError

# Sanity bounds, so a corrupt count fails at once instead of looping for hours or allocating wildly.
_MAX_ENTRIES = 1 << 24
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class _Malformed(Exception):
    """What is wrong with the header; ``read_gguf_header`` names the file."""


@dataclass(frozen=True)
class SkippedStrings:
    """A metadata array of strings left undecoded (a tokenizer's vocabulary or merges): only its length."""

    count: int


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor of a GGUF file lies; ``data`` reads it as ``GGUFReader`` presents it (blocks as rows of
    bytes)."""

    path: Path
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml's order, innermost first
    offset: int  # absolute, in bytes
    dtype: np.dtype  # uint8 for a block-quantized type
    data_shape: tuple[int, ...]

    @property
    def n_bytes(self) -> int:
        return int(np.prod(self.data_shape)) * self.dtype.itemsize

    @property
    def data(self) -> np.ndarray:
        return self.rows_data(0, self.data_shape[0])

    def rows_data(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``data`` (rows are the outermost dimension; a quantized row is whole blocks).

        Read, not mapped: pages of a mapped file count in the process's memory for as long as the map lives, and
        a loader that keeps each tensor quantized needs its bytes only while it converts them."""
        row_items = int(np.prod(self.data_shape[1:]))
        offset = self.offset + start * row_items * self.dtype.itemsize
        count = (stop - start) * row_items
        data = np.fromfile(self.path, dtype=self.dtype, count=count, offset=offset)
        return data.reshape(stop - start, *self.data_shape[1:])


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars as Python values, numeric arrays as lists, string arrays as SkippedStrings
    tensors: tuple[GGUFTensor, ...]


class _Cursor:
    """Little-endian reads from a buffer at a moving offset; running past its end is a truncated file."""

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from(fmt, self.buffer, self.offset)
        except struct.error:
            raise _Malformed("truncated: the header ends early") from None
        self.offset += struct.calcsize(fmt)
        return values

    def count(self, what: str) -> int:
        (n,) = self.unpack("<Q")
        if n > _MAX_ENTRIES:
            raise _Malformed(f"{what} count {n} is not plausible (corrupt header?)")
        return n

    def string(self) -> str:
        n = self.count("string length")
        raw = bytes(self.buffer[self.offset : self.offset + n])
        if len(raw) != n:
            raise _Malformed("truncated: the header ends early")
        self.offset += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("a header string is not UTF-8 (corrupt header?)") from None

    def skip_strings(self, n: int) -> None:
        offset, buffer = self.offset, self.buffer
        try:
            for _ in range(n):
                offset += 8 + struct.unpack_from("<Q", buffer, offset)[0]
        except struct.error:
            raise _Malformed("truncated: the header ends early") from None
        if offset > len(buffer):
            raise _Malformed("truncated: the header ends early")
        self.offset = offset


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as V

    return {
        V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
    }  # fmt: skip


def _value(cursor: _Cursor, value_type: int, formats: dict[int, str]) -> Any:
    from gguf import GGUFValueType

    if value_type == GGUFValueType.STRING:
        return cursor.string()
    if value_type in formats:
        return cursor.unpack(formats[value_type])[0]
    if value_type != GGUFValueType.ARRAY:
        raise _Malformed(f"unknown metadata value type {value_type} (corrupt header?)")
    (item_type,) = cursor.unpack("<I")
    n = cursor.count("array")
    if item_type == GGUFValueType.STRING:
        cursor.skip_strings(n)
        return SkippedStrings(n)
    if item_type in formats:
        fmt = formats[item_type]
        return list(cursor.unpack(f"<{n}{fmt[1:]}"))
    raise _Malformed(f"metadata array of value type {item_type} (corrupt header?)")


def _tensor_array(tensor_type: Any, dims: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of the tensor's data as ``GGUFReader`` presents it: rows of block bytes when quantized."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    plain = {Q.F16: np.float16, Q.F32: np.float32, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
             Q.I32: np.int32, Q.I64: np.int64}  # fmt: skip
    shape = tuple(reversed(dims))
    if tensor_type in plain:
        return np.dtype(plain[tensor_type]), shape
    return np.dtype(np.uint8), tuple(quant_shape_to_byte_shape(shape, tensor_type))


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of GGUF file ``path``: metadata, and each tensor's type, shape and absolute data offset."""
    source = Path(path)
    try:
        import gguf  # noqa: F401  (its constants define the format)
    except ImportError as e:
        raise WeightsError(f"reading {source} needs the 'gguf' package: pip install gguf") from e
    try:
        with open(source, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise _Malformed(f"too short to hold a header ({size} bytes)")
            # a map, not a read: only the header's pages are touched, and it is closed before any tensor is read
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse(_Cursor(buffer), source, size)
    except _Malformed as e:
        raise WeightsError(f"cannot read GGUF file {source}: {e}") from None
    except OSError as e:
        raise WeightsError(f"cannot read GGUF file {source}: {e}") from e


def _parse(cursor: _Cursor, source: Path, size: int) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

    if cursor.unpack("<I")[0] != GGUF_MAGIC:
        raise _Malformed("not a GGUF file (its first bytes are not 'GGUF')")
    (version,) = cursor.unpack("<I")
    if version not in (2, 3):
        swapped = version & 0xFFFF == 0  # a big-endian file's version, read little-endian
        raise _Malformed("big-endian, unsupported" if swapped else f"version {version} (olmo-tap reads 2 and 3)")
    n_tensors, n_metadata = cursor.count("tensor"), cursor.count("metadata")
    formats = _scalar_formats()
    metadata: dict[str, Any] = {}
    for _ in range(n_metadata):
        key = cursor.string()
        (value_type,) = cursor.unpack("<I")
        if key in metadata:
            raise _Malformed(f"metadata key {key!r} appears twice")
        metadata[key] = _value(cursor, value_type, formats)
    entries = []
    for _ in range(n_tensors):
        name = cursor.string()
        (n_dims,) = cursor.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Malformed(f"tensor {name} has {n_dims} dimensions (corrupt header?)")
        dims = cursor.unpack(f"<{n_dims}Q")
        raw_type, offset = cursor.unpack("<IQ")
        entries.append((name, dims, raw_type, offset))
    align = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align % 8:
        raise _Malformed(f"general.alignment {align!r} is not a positive multiple of 8")
    data_start = -(-cursor.offset // align) * align
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    for name, dims, raw_type, offset in entries:
        if name in names:
            raise _Malformed(f"tensor {name} appears twice")
        names.add(name)
        try:
            tensor_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[tensor_type]
            dtype, data_shape = _tensor_array(tensor_type, dims)
        except (ValueError, KeyError) as e:
            raise _Malformed(f"tensor {name}: {e}") from None
        start = data_start + offset
        if start + math.prod(dims) * type_size // block > size:  # Python's integers: a corrupt size cannot wrap
            raise _Malformed(f"truncated: tensor {name} ends past the end of the file")
        tensors.append(GGUFTensor(source, name, tensor_type, tuple(dims), start, dtype, data_shape))
    return GGUFHeader(version, metadata, tuple(tensors))
