"""GCG's settings: a module of its own, without torch, so that the CLI builds its parser (with these defaults in
its help) without loading torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GCGSettings:
    suffix_tokens: int = 12
    steps: int = 24
    candidates: int = 32
    top_k: int = 64
    questions_per_suffix: int = 8
    kappa: float = 4.0
    target: str = "jury"  # "jury" or "head:<i>"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("suffix_tokens", "steps", "candidates", "top_k", "questions_per_suffix"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GCG {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.kappa < 0:
            raise ValueError(f"GCG kappa must be >= 0, got {self.kappa}")
        parse_target(self.target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_target(target: str) -> int | None:
    """``"jury"`` -> None; ``"head:<i>"`` -> i."""
    if target == "jury":
        return None
    if target.startswith("head:") and target[5:].isdigit():
        return int(target[5:])
    raise ValueError(f"attack target must be 'jury' or 'head:<i>', got {target!r}")
