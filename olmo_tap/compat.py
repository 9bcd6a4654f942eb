"""Names kept only for users of the original system (msc-ai-mmmjo/tap).

The original Hydra held its KV cache and advanced hidden position counters on every call:
``model.init_kv_cache(batch, max_len, omit_last)``, then ``model(ids)`` step after step, ``reset_kv_cache``
between generations. olmo-tap's model is stateless (a cache is passed in with explicit positions, see
``olmo_tap.hydra``); ``StatefulHydra`` wraps one in the original's calling convention, so code written for
the original runs unchanged after ``model = StatefulHydra(model)``. New code should not use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.model.kv_cache import HydraCache


class StatefulHydra:
    """A HydraTransformer with the original's own cache: every cached call continues where the last one ended
    (the trunk and each head keep their own count; ``rollback_kv_cache`` and ``sync_kv_cache`` move them)."""

    def __init__(self, model: HydraTransformer) -> None:
        self.model = model
        self.cache: HydraCache | None = None
        self._trunk = 0
        self._heads = [0] * model.n_heads
        self._uncached: set[int] = set()

    def __getattr__(self, name: str) -> Any:  # everything else is the model's
        return getattr(self.model, name)

    def init_kv_cache(self, batch_size: int, max_seq_len: int, omit_last: bool = False) -> None:
        """Caches for ``batch_size`` sequences of ``max_seq_len``; with ``omit_last`` the last head runs uncached."""
        heads = self.model.n_heads - (1 if omit_last else 0)
        self.cache = HydraCache(self.model, batch_size, max_seq_len, heads=heads) if heads else None
        self.reset_kv_cache(omit_last)

    def reset_kv_cache(self, omit_last: bool = False) -> None:
        self._uncached = {self.model.n_heads - 1} if omit_last else set()
        self._trunk, self._heads = 0, [0] * self.model.n_heads

    def rollback_kv_cache(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot roll back a negative number of tokens ({n})")
        self._trunk = max(0, self._trunk - n)
        self._heads = [max(0, p - n) for p in self._heads]

    def sync_kv_cache(self, target_length: int) -> None:
        self._trunk, self._heads = target_length, [target_length] * self.model.n_heads

    def kv_cache_lengths(self) -> dict[str, Any]:
        return {"trunk": self._trunk, "heads": list(self._heads)}

    def forward_trunk(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.cache is None:
            return self.model.forward_trunk(input_ids)
        hidden = self.model.forward_trunk(input_ids, self._trunk, self.cache)
        self._trunk += input_ids.size(1)
        return hidden

    def forward_heads(
        self,
        hidden_states: torch.Tensor,
        head_indices: Sequence[int] | None = None,
        residual: torch.Tensor | None = None,
        last_token_only: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        heads = list(range(self.model.n_heads)) if head_indices is None else [int(h) for h in head_indices]
        outputs = []
        for h in heads:  # each head at its own count (the original's heads could stand at different lengths)
            cached = self.cache is not None and h not in self._uncached
            start = self._heads[h] if cached else 0
            outputs.append(
                self.model.forward_heads(
                    hidden_states, [h], residual, last_token_only, start, self.cache if cached else None
                )
            )
            if cached:
                self._heads[h] = start + hidden_states.size(1)
        return torch.cat(outputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        residual: torch.Tensor | None = None,
        head_indices: Sequence[int] | None = None,
        last_token_only: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.forward_heads(self.forward_trunk(input_ids), head_indices, residual, last_token_only)

    __call__ = forward
