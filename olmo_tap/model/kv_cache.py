"""Keys and values of many sequences, owned by a decoder and passed to the model with explicit positions.

A ``HydraCache`` has ``slots`` rows; a sequence holds one slot for its life. Every layer keeps storage
(slots, towers, kv_heads, max_len, head_dim): one tower for a trunk layer, one per text head for a head layer
(the uncertainty head always runs uncached, so it has none). A slot's towers lie next to each other, so the
keys of several towers of one slot are one view that merges into a batch of matrices without a copy.

Next to the storage the cache keeps how many positions of each slot are valid, for the trunk and for every
text head; the model sets a length when it writes and refuses a write that would leave a gap (attend to
stale entries). A rollback or sync is the decoder passing an earlier position with its next write: nothing
is copied, entries past a length are stale and never attended to.

Why slots and not pages: a slot's keys of positions [0, n) are one strided view, so attention reads them with
no gather and no index tensors, and a whole slot is freed by setting its lengths to 0. The price is memory
reserved up front per slot (``max_len`` positions): the service sizes ``max_len`` to its per-request bound and
checks the total before it starts (``olmo_tap.serve.memcheck``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from olmo_tap.hydra import HydraTransformer


class CacheOverflowError(ValueError):
    """More positions were requested than the cache was sized for."""


class CacheMemoryError(ValueError):
    """The cache asked for is more memory than the device can give (a request's size, not a fault)."""


@dataclass(frozen=True)
class Rows:
    """Where the rows of a flattened batch sit: row i is ``lengths[i]`` tokens of cache slot ``slots[i]``, the
    first at absolute position ``starts[i]``. Rows follow each other in the flattened token dimension."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def uniform(cls, batch: int, start: int, length: int) -> Rows:
        """``batch`` rows in slots 0..batch-1, all at ``start`` with ``length`` tokens (a plain (batch, seq))."""
        return cls(tuple(range(batch)), (start,) * batch, (length,) * batch)

    @classmethod
    def of(cls, slots: Sequence[int], starts: Sequence[int], lengths: Sequence[int]) -> Rows:
        return cls(tuple(int(s) for s in slots), tuple(int(p) for p in starts), tuple(int(n) for n in lengths))

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def is_uniform(self) -> bool:
        """All rows start at the same position with the same length (one (batch, seq) block)."""
        return len(set(self.starts)) == 1 and len(set(self.lengths)) == 1

    def positions(self) -> list[int]:
        """The absolute position of every flattened token."""
        return [p for start, n in zip(self.starts, self.lengths, strict=True) for p in range(start, start + n)]


class LayerCache:
    """Storage of one layer: (slots, towers, kv_heads, max_len, head_dim) keys and values."""

    def __init__(
        self,
        towers: int,
        slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, towers, n_kv_heads, max_len, head_dim)
        # Never read before written (lengths guard it), so not zeroed: the pages of a slot sized for the whole
        # context are committed only as far as its sequences reach.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def update(
        self, towers: slice, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (n_towers, kv_heads, seq, head_dim) of ``slot`` at ``start``; return that slot's keys
        and values of positions [0, start + seq) for the same towers (views, no copy)."""
        end = start + k.size(2)
        keys, values = self.k[slot, towers, :, :end], self.v[slot, towers, :, :end]
        keys[:, :, start:].copy_(k)
        values[:, :, start:].copy_(v)
        return keys, values


class HydraCache:
    """Caches of every layer of ``model`` for ``slots`` sequences of at most ``max_len`` positions each: the trunk
    and the first ``heads`` heads (default: the text heads), in the model's cache dtype, on its device. The model
    reads and writes it; the decoder owns it."""

    def __init__(self, model: HydraTransformer, slots: int, max_len: int, heads: int | None = None) -> None:
        c = model.base_config
        if slots < 1:
            raise ValueError(f"a cache needs at least 1 slot, got {slots}")
        if not 1 <= max_len <= c.max_seq_len:
            raise CacheOverflowError(
                f"max_len must be between 1 and the model's context of {c.max_seq_len}, got {max_len}"
            )
        self.slots = slots
        self.max_len = max_len
        self.n_text_heads = model.n_text_heads if heads is None else heads
        shape = (slots, c.n_kv_heads, max_len, c.head_dim, model.cache_dtype, model.device)
        try:
            self.trunk = [LayerCache(1, *shape) for _ in range(model.config.trunk_layers)]
            self.heads = [LayerCache(self.n_text_heads, *shape) for _ in range(model.config.head_layers)]
        except RuntimeError as e:  # torch's allocator: a long context's cache asked for more than the machine has
            need = slots * self.bytes_per_slot(model, max_len, self.n_text_heads)
            raise CacheMemoryError(
                f"the KV cache for {slots} sequence(s) of up to {max_len} positions needs {need / 2**30:.1f} GiB "
                f"on {model.device}, more than can be allocated ({str(e).splitlines()[0][:200]}); fewer positions "
                "(new tokens) or sequences (a server's --max-batch) need less"
            ) from None
        # valid positions per slot: the trunk's, and each text head's
        self.trunk_lengths = [0] * slots
        self.head_lengths = [[0] * self.n_text_heads for _ in range(slots)]

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in (*self.trunk, *self.heads))

    @staticmethod
    def bytes_per_slot(model: HydraTransformer, max_len: int, heads: int | None = None) -> int:
        """Bytes one slot of ``max_len`` positions takes for ``model`` (keys and values of every cached tower: the
        trunk's and ``heads`` heads', default the text heads)."""
        c = model.base_config
        towers = model.config.trunk_layers + model.config.head_layers * (model.n_text_heads if heads is None else heads)
        return 2 * towers * c.n_kv_heads * max_len * c.head_dim * model.cache_dtype.itemsize

    def lengths(self, slot: int) -> dict[str, object]:
        return {"trunk": self.trunk_lengths[slot], "heads": list(self.head_lengths[slot])}

    def release(self, slot: int) -> None:
        """Forget everything ``slot`` holds (its storage is reused as is)."""
        self.trunk_lengths[slot] = 0
        self.head_lengths[slot] = [0] * self.n_text_heads

    def copy_prefix(self, src: int, dst: Sequence[int], n: int) -> None:
        """Give slots ``dst`` the first ``n`` positions of slot ``src`` (trunk and every text head): sequences that
        share a prompt compute it once."""
        have = min(self.trunk_lengths[src], *self.head_lengths[src])
        if not 0 <= n <= have:
            raise ValueError(f"slot {src} holds {have} positions in every layer, cannot copy {n}")
        for slot in dst:
            self._check(slot, 0, n, 0, "the copy")
            for layer in (*self.trunk, *self.heads):
                layer.k[slot, :, :, :n].copy_(layer.k[src, :, :, :n])
                layer.v[slot, :, :, :n].copy_(layer.v[src, :, :, :n])
            self.trunk_lengths[slot] = n
            self.head_lengths[slot] = [n] * self.n_text_heads

    def claim_trunk(self, rows: Rows) -> None:
        """Check that every row's write continues its slot's valid trunk positions, then extend them."""
        for slot, start, n in zip(rows.slots, rows.starts, rows.lengths, strict=True):
            self._check(slot, start, n, self.trunk_lengths[slot], "the trunk")
            self.trunk_lengths[slot] = start + n

    def claim_heads(self, rows: Rows, towers: range) -> None:
        """As ``claim_trunk``, for the text heads ``towers``."""
        if towers.stop > self.n_text_heads:
            raise ValueError(
                f"heads {list(towers)} are not all cached text heads (0..{self.n_text_heads - 1}); "
                "the uncertainty head runs uncached"
            )
        for slot, start, n in zip(rows.slots, rows.starts, rows.lengths, strict=True):
            lengths = self.head_lengths[slot]
            for h in towers:
                self._check(slot, start, n, lengths[h], f"head {h}")
            for h in towers:
                lengths[h] = start + n

    def _check(self, slot: int, start: int, n: int, valid: int, what: str) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside the cache's {self.slots} slots")
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        if start > valid:
            raise ValueError(
                f"slot {slot}: {what} holds {valid} positions; writing at {start} would leave a gap "
                "(run the positions in between first)"
            )
        if start + n > self.max_len:
            raise CacheOverflowError(
                f"{start + n} positions do not fit the KV cache of {self.max_len} per sequence "
                "(make a cache with a larger max_len, or shorten the input)"
            )
