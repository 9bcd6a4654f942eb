"""What verification reads and writes: token-difr's records (same names and fields), and their JSONL files."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from olmo_tap.jsonl import iter_jsonl

# torch.Generator.manual_seed takes [-2**63, 2**64), and olmo-tap's per-position streams hash the integer itself:
# the two would read a negative seed differently, so a record's seed must lie in [0, 2**64).
SEED_BOUND = 2**64


class SamplingMethod(Enum):
    """How the claimed tokens were sampled; each method fixes where the noise comes from."""

    # token-difr's reconstruction of vLLM V1's sampler: one torch.Generator per sequence on the logits'
    # device, seeded once, one exponential row per output position in order; token = argmax(probs / E).
    VLLM_GUMBEL_MAX = "vllm_gumbel_max"
    # olmo-tap's own samplers: Gumbel noise drawn on the CPU per (seed, absolute position, purpose), so it is
    # the same on every device; token = argmax(logits / T + G).
    OLMO_TAP = "olmo_tap"

    @classmethod
    def parse(cls, value: SamplingMethod | str) -> SamplingMethod:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown sampling method {value!r}; use one of: {names}") from None


@dataclass
class TokenSequence:
    """A prompt and the output a provider claims to have sampled for it (token ids, never re-tokenised text).

    ``seed`` (optional) overrides the call's seed for this sequence: token-difr allows one seed per call only.
    """

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.seed is None:
            del data["seed"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenSequence:
        if not isinstance(data, dict):
            raise ValueError(f"a TokenSequence must be a JSON object, got {type(data).__name__}")
        for name in ("prompt_token_ids", "output_token_ids"):
            if name not in data:
                raise ValueError(f"missing field {name!r}")
            value = data[name]
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ValueError(f"field {name!r} must be a list of integer token ids")
        if not data["prompt_token_ids"]:
            raise ValueError("field 'prompt_token_ids' must not be empty (the model needs a context)")
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"field 'seed' must be an integer, got {seed!r}")
        if seed is not None and not 0 <= seed < SEED_BOUND:
            raise ValueError(f"field 'seed' must be between 0 and 2**64 - 1, got {seed}")
        return cls(list(data["prompt_token_ids"]), list(data["output_token_ids"]), seed)


@dataclass
class TokenMetrics:
    """How one claimed token looks to the verifier (token-difr's definitions, see ``olmo_tap.verify.scoring``)."""

    exact_match: bool  # the verifier's own sample at this position is the claimed token
    prob: float  # the claimed token's probability after temperature and filters
    margin: float  # max(l + T*G) - (l_claimed + T*G_claimed); 0 on a match, inf if the claimed token was filtered
    logit_rank: float  # how many logits are larger than the claimed token's
    gumbel_rank: float  # how many noisy scores are larger than the claimed token's (inf if filtered)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity: write it as a string that from_dict and most readers understand.
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenMetrics:
        def number(v: Any) -> float:
            return float("inf") if v == "inf" else float(v)

        return cls(
            bool(data["exact_match"]),
            number(data["prob"]),
            number(data["margin"]),
            number(data["logit_rank"]),
            number(data["gumbel_rank"]),
        )


def read_token_sequences(path: str | Path) -> list[TokenSequence]:
    """TokenSequence records from a JSONL file; a bad line raises ValueError naming its line number."""
    sequences = []
    number = 0
    try:
        for number, record in iter_jsonl(path):
            try:
                sequences.append(TokenSequence.from_dict(record))
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: the record after line {number} is too deeply nested JSON") from None
    return sequences
