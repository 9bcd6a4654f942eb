"""Architecture description of a single-tower transformer (the Hydra's base model).

One dataclass covers both families we run:

- ``olmo2``: "reordered" post-sublayer RMSNorm, QK-norm over the full q/k
  projections, untied lm_head (OLMo-2 1B / 7B);
- ``llama``: pre-norm, grouped-query attention, optionally tied embeddings
  (SmolLM2, the embedded default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from olmo_tap.jsonl import is_finite_number

Family = Literal["olmo2", "llama"]
FAMILIES: tuple[str, ...] = ("olmo2", "llama")


class ConfigError(ValueError):
    """A model or Hydra configuration that cannot be built."""


@dataclass(frozen=True)
class TransformerConfig:
    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unsupported architecture family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "ffn_hidden",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        # a negative, zero or non-finite rotary base, or a negative or non-finite norm epsilon, gives NaN or
        # meaningless logits without an error anywhere downstream
        if not is_finite_number(self.rope_theta) or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if not is_finite_number(self.norm_eps) or self.norm_eps < 0:
            raise ConfigError(f"norm_eps must be a finite number >= 0, got {self.norm_eps!r}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def olmo2_1b(cls, vocab_size: int = 100352) -> TransformerConfig:
        """OLMo-2-0425-1B: 16 layers, d_model 2048, 16 heads, FFN 8192."""
        return cls("olmo2", vocab_size, 2048, 16, 16, 16, 128, 8192, 500000.0, 1e-6, False, 4096, 100257, 100257)

    @classmethod
    def olmo2_7b(cls, vocab_size: int = 100352) -> TransformerConfig:
        """OLMo-2-1124-7B: 32 layers, d_model 4096, 32 heads, FFN 11008."""
        return cls("olmo2", vocab_size, 4096, 32, 32, 32, 128, 11008, 500000.0, 1e-6, False, 4096, 100257, 100257)
