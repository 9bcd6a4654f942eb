"""Preallocated key/value storage for one layer, addressed by absolute position.

One cache serves a stack of ``n`` parallel towers (``n == 1`` for a trunk layer,
``n == n_heads`` for a head layer). The cache holds no lengths: the model keeps
one integer per tower, so rolling back or syncing moves a counter and copies
nothing. Entries past a counter are stale; they are overwritten by the next
write and never attended to.
"""

from __future__ import annotations

import torch


class CacheOverflowError(ValueError):
    """More positions were requested than the cache was sized for."""


class KVCache(torch.nn.Module):
    def __init__(
        self,
        n: int,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (n, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, sel: slice, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (n_sel, batch, kv_heads, seq, head_dim) for towers ``sel`` at
        position ``start``; return their keys/values for positions ``[0, start + seq)``."""
        end = start + k.size(3)
        keys, values = self.k, self.v
        if sel.start != 0 or sel.stop != keys.size(0):  # a sub-range of the towers
            keys, values = keys[sel], values[sel]
        keys, values = keys[:, :, :, :end], values[:, :, :, :end]
        keys[:, :, :, start:].copy_(k)
        values[:, :, :, start:].copy_(v)
        return keys, values
