"""Linear weights kept quantized in memory: two storage schemes that every supported format maps onto exactly.

- ``int8``: signed 8-bit codes ``q`` (out, in), one fp32 scale per group of ``group`` inputs; w = q * scale.
  Per-channel (``group == in``) is what ``--quantize int8`` makes; GGUF's Q8_0 (groups of 32) and Q6_K (6-bit
  codes, groups of 16) load into it without changing a value.
- ``int4``: unsigned 4-bit codes, two per byte, one fp32 scale and one fp32 minimum per group of 32 inputs;
  w = q * scale + minimum. In each group byte j holds input j in its low nibble and input j + 16 in its high
  nibble (ggml's order for Q4_0 / Q4_1). ``--quantize int4`` makes it (asymmetric, Q4_1's rule: scale =
  (max - min) / 15); GGUF's Q4_0, Q4_1 and Q4_K load into it without changing a value (Q4_K's nibbles are
  reordered at load, its 6-bit sub-block scales multiplied out).

Scales are kept in fp32 so that every format's (scale, minimum) pair is exact (Q4_K's d * sc needs 17 bits).

Either scheme is held in one of two layouts: by rows as above, or **tiled** for the native kernel
(``QuantizedWeight.tile_``; olmo_tap/quant/native.cpp): output rows in tiles of 8 (the last padded with zero rows),
codes (tiles, bytes per row / 4, 8, 4) with each run of 4 code bytes of the tile's 8 rows side by side, scale and
minimum (tiles, groups, 8), in fp16 where every one of them is exact in it (GGUF's Q4_0, Q4_1, Q5_0 and Q8_0 blocks
store fp16 scales: 17% fewer bytes per int4 weight to stream). The same values; a quantized model's weights are
tiled once at load where the native kernel is the route, and anything that reads rows (an embedding lookup, the
dequantizing routes) reads them back in fp32.
Rows are independent, so fused projections (q/k/v, gate/up) are built by concatenating rows of the same scheme;
a fused weight whose parts differ in scheme keeps its parts (``QuantizedStack``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4")
INT4_GROUP = 32
TILE_ROWS = 8  # output rows per tile of the tiled layout (one AVX2 register's float lanes)
TILE_BYTES = 4  # bytes of a row side by side with the other rows' in the tiled layout


def tile_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(out, n) by rows -> (tiles, n // width, 8, width): output rows padded with zeros to a multiple of 8, then
    each run of ``width`` elements of a tile's 8 rows side by side."""
    out, n = t.shape
    if out % TILE_ROWS:
        t = torch.cat((t, t.new_zeros(-out % TILE_ROWS, n)))
    return t.reshape(-1, TILE_ROWS, n // width, width).transpose(1, 2).contiguous()


def weight_rows(t: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """Rows ``rows`` of a weight's codes, scale or minimum, by rows, from either layout (tiled: (tiles, runs, 8,
    width) or (tiles, runs, 8); ``rows`` then an index tensor). Plain tensor code, so a compiled step traces it."""
    if t.dim() == 2:
        return t[rows]
    assert isinstance(rows, torch.Tensor), "rows of a tiled weight are read by index"
    picked = t[rows // TILE_ROWS, :, rows % TILE_ROWS].reshape(rows.numel(), -1)
    return picked.float() if picked.is_floating_point() else picked  # scales stored in fp16 are read in fp32


@dataclass
class QuantizedWeight:
    """One linear weight (out, in) in ``scheme``; ``source`` says where the codes came from (``int8``,
    ``int4``, or the GGUF type such as ``Q4_1``)."""

    scheme: str
    codes: torch.Tensor  # int8 (out, in) or uint8 (out, in // 2)
    scale: torch.Tensor  # fp32 (out, in // group)
    minimum: torch.Tensor | None  # fp32 (out, in // group) for int4, None for int8
    group: int
    source: str
    tiled_rows: int | None = None  # in the tiled layout: the real output rows (else None: by rows)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "int4" and (self.group != INT4_GROUP or self.minimum is None):
            raise ValueError(f"int4 weights come in groups of {INT4_GROUP} with a minimum per group")
        if self.in_features % self.group:
            raise ValueError(f"{self.in_features} inputs do not split into groups of {self.group}")

    @property
    def tiled(self) -> bool:
        return self.tiled_rows is not None

    @property
    def out_features(self) -> int:
        return self.codes.size(0) if self.tiled_rows is None else self.tiled_rows

    @property
    def in_features(self) -> int:
        row_bytes = self.codes.size(1) * (TILE_BYTES if self.tiled else 1)
        return row_bytes * (2 if self.scheme == "int4" else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.scale] + ([self.minimum] if self.minimum is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale] + ([self.minimum] if self.minimum is not None else [])

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (out, in) in ``dtype`` (the value computed in fp32, then cast); only ``rows`` if given
        (an embedding lookup reads a few rows of a quantized table)."""
        part = self.untiled() if rows is None else self.select_rows(rows)
        return dequantize_codes(part.scheme, part.codes, part.scale, part.minimum).to(dtype)

    def select_rows(self, rows: torch.Tensor | slice) -> QuantizedWeight:
        """The weight of output rows ``rows`` (an index tensor or a slice), same scheme, by rows."""
        if self.tiled and isinstance(rows, slice):
            rows = torch.arange(self.out_features)[rows]
        codes, scale = weight_rows(self.codes, rows), weight_rows(self.scale, rows)
        minimum = None if self.minimum is None else weight_rows(self.minimum, rows)
        return QuantizedWeight(self.scheme, codes, scale, minimum, self.group, self.source)

    def untiled(self) -> QuantizedWeight:
        """The weight by rows (itself if it is)."""
        return self.select_rows(slice(None)) if self.tiled else self

    def tile_(self) -> None:
        """Put the weight in the tiled layout, in place (every holder of this object sees it tiled)."""
        if self.tiled:
            return
        out = self.out_features
        # fp16 where every scale and minimum is exact in it (GGUF's own blocks): fewer bytes per token, same values
        floats = self.tensors()[1:]
        storage = torch.float16 if all(torch.equal(t.half().float(), t) for t in floats) else torch.float32
        self.codes = tile_rows(self.codes, TILE_BYTES)
        self.scale = tile_rows(self.scale.to(storage), 1).squeeze(-1)
        self.minimum = None if self.minimum is None else tile_rows(self.minimum.to(storage), 1).squeeze(-1)
        self.tiled_rows = out

    def as_tiled(self) -> QuantizedWeight:
        """The weight in the tiled layout (itself if it is)."""
        if self.tiled:
            return self
        tiled = dataclasses.replace(self)
        tiled.tile_()
        return tiled

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The weight on ``device``, by rows (only the CPU's native kernel reads the tiled layout)."""
        w = self.untiled()
        minimum = None if w.minimum is None else w.minimum.to(device)
        return QuantizedWeight(w.scheme, w.codes.to(device), w.scale.to(device), minimum, w.group, w.source)


def dequantize_codes(
    scheme: str, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
) -> torch.Tensor:
    """fp32 values (out, in) of codes in ``scheme`` with per-group ``scale`` (and ``minimum``): q * scale (+ min).
    Plain tensor code, so a compiled step traces it too."""
    out, groups = scale.shape
    if scheme == "int8":
        q = codes.view(out, groups, -1).float()
    else:
        grouped = codes.view(out, groups, INT4_GROUP // 2)
        q = torch.cat(((grouped & 15).float(), (grouped >> 4).float()), dim=-1)
    w = q * scale.unsqueeze(-1)
    if minimum is not None:
        w = w + minimum.unsqueeze(-1)
    return w.view(out, -1)


def concat_rows(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights of one scheme and group along their output rows (a fused projection), by rows."""
    parts = [p.untiled() for p in parts]
    first = parts[0]
    if any(p.scheme != first.scheme or p.group != first.group or p.in_features != first.in_features for p in parts):
        raise ValueError("only weights of one scheme, group and input size concatenate")
    minimum = None if first.minimum is None else torch.cat([p.minimum for p in parts])  # type: ignore[misc]
    sources = sorted({p.source for p in parts})
    return QuantizedWeight(
        first.scheme,
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        minimum,
        first.group,
        "+".join(sources),
    )


@dataclass
class QuantizedStack:
    """A fused projection of one tower: its output rows as consecutive parts (one part when the schemes agree)."""

    parts: list[QuantizedWeight]

    @classmethod
    def of(cls, parts: Sequence[QuantizedWeight]) -> QuantizedStack:
        """Merge consecutive parts of the same scheme and group, so most fused projections are one product."""
        merged: list[list[QuantizedWeight]] = []
        for part in parts:
            last = merged[-1][0] if merged else None
            if last is not None and (last.scheme, last.group) == (part.scheme, part.group):
                merged[-1].append(part)
            else:
                merged.append([part])
        return cls([group[0] if len(group) == 1 else concat_rows(group) for group in merged])

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])


# rows quantized at a time (a vocabulary-sized table would otherwise need several float copies of itself)
ROWS_PER_CHUNK = 2048


def quantize(weight: torch.Tensor, scheme: str, source: str | None = None) -> QuantizedWeight:
    """Quantize a float weight (out, in): ``int8`` symmetric per output channel (scale = max |w| / 127, codes
    rounded to nearest), ``int4`` asymmetric in groups of 32 (scale = (max - min) / 15, minimum = min, codes
    round((w - min) / scale) clamped to [0, 15]: Q4_1's rule). Computed in fp32."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if weight.size(0) > ROWS_PER_CHUNK:  # rows quantize independently: chunks keep the float temporaries small
        chunks = weight.split(ROWS_PER_CHUNK)
        return concat_rows([quantize(chunk, scheme, source) for chunk in chunks])
    w = weight.detach().float().contiguous()  # codes in row order whatever view came in (a kernel streams rows)
    out, n_in = w.shape
    if scheme == "int8":
        scale = w.abs().amax(dim=1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", codes, scale, None, n_in, source or "int8")
    if n_in % INT4_GROUP:
        raise ValueError(f"int4 quantization needs inputs in groups of {INT4_GROUP}; this weight has {n_in}")
    groups = w.view(out, n_in // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((groups - low.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", pack_int4(q.view(out, n_in)), scale, low, INT4_GROUP, source or "int4")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in [0, 16), input order -> bytes (out, in // 2) in ggml's per-group nibble order."""
    out, n_in = q.shape
    grouped = q.to(torch.uint8).view(out, n_in // INT4_GROUP, 2, INT4_GROUP // 2)
    return (grouped[:, :, 0] | (grouped[:, :, 1] << 4)).reshape(out, n_in // 2).contiguous()
