"""Support scores (how far a premise entails a hypothesis, in [0, 1]) as a similarity or a caller returns them:
checked once, for KLE's matrix and the claim ledger alike."""

from __future__ import annotations

import math
from typing import Any

SCORE_TOLERANCE = 1e-6  # support scores this far outside [0, 1] are float noise, clipped; beyond it, an error


def check_support_scores(scores: Any, n_pairs: int) -> list[float]:
    """The support scores, clipped to [0, 1]; ValueError naming the problem when they are not n_pairs numbers in
    [0, 1] (to ``SCORE_TOLERANCE``)."""
    try:
        values = list(scores)
    except TypeError:
        raise ValueError(f"support must return a sequence of scores, got {type(scores).__name__}") from None
    if len(values) != n_pairs:
        raise ValueError(f"support returned {len(values)} scores for {n_pairs} (premise, claim) pairs")
    checked = []
    for i, value in enumerate(values):
        # numpy and torch scalars convert with float(); a string would too, and a bool is a number only by accident
        try:
            number = float(value) if not isinstance(value, bool | str | bytes) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number):
            raise ValueError(f"support score {i} is not a number: {value!r}")
        if not -SCORE_TOLERANCE <= number <= 1.0 + SCORE_TOLERANCE:
            raise ValueError(f"support score {i} is outside [0, 1]: {value!r}")
        checked.append(min(1.0, max(0.0, number)))
    return checked
