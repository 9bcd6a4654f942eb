"""Trust signals of the jury, as pure functions with stated semantics.

Votes: each verifier head votes for its own most likely token (argmax of its
logits over the real vocabulary).

- Stability radius of an emitted token A: how many verifier votes can flip,
  all to the strongest competitor B, before A loses, with ties going to A:
  ``max(0, (n_A - n_B) // 2)``. (Under strict plurality it would be
  ``max(0, (n_A - n_B - 1) // 2)``; we keep the original's tie rule.)
- Validity radius of a rejected draft D: the exact minimum number of votes that
  must flip to D for D to hold a strict plurality. Greedily taking one vote at
  a time from the current largest competitor is optimal: each flip raises D by
  one and lowers the largest competitor by one, and no flip can do better.
- Stability margin: top-1 minus top-2 probability of the jury's distribution.
- Entropy: Shannon entropy, in nats, of the jury's distribution.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch


def stability_radius(votes: Sequence[int], token: int) -> int:
    """Votes that can flip to the strongest competitor while ``token`` keeps at least as many (ties to A)."""
    counts = Counter(votes)
    n_a = counts.pop(token, 0)
    n_b = max(counts.values(), default=0)
    return max(0, (n_a - n_b) // 2)


def validity_radius(votes: Sequence[int], token: int) -> int:
    """Minimum number of vote flips that gives ``token`` a strict plurality."""
    counts = Counter(votes)
    n_target = counts.pop(token, 0)
    competitors = sorted(counts.values(), reverse=True)
    flips = 0
    while competitors and n_target <= competitors[0]:
        competitors[0] -= 1
        competitors.sort(reverse=True)
        n_target += 1
        flips += 1
    return flips


def entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension, 0 log 0 = 0 (a zero probability meets a finite log: 0 x log(tiny) = 0).
    ``torch.special.entr`` gives the same values with a scalar loop: ~5x slower over a 49k vocabulary, and it
    ran once per PoE round."""
    p = probs.float()
    return -(p * p.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(dim=-1)


def top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability over the last dimension (a repeated maximum is its own runner-up: 0).

    fp32 rows on CPU are read by numpy: the largest value, then the largest of the rest of the row, the values
    ``torch.topk(probs, 2)`` gives (~50 against ~240 us over a 49k vocabulary on the 2-core Xeon, once per
    decoded token). A NaN counts as the largest value in both: the margin is then NaN."""
    probs = probs.float()
    if probs.device.type != "cpu" or probs.ndim == 0 or probs.size(-1) < 2:
        top = torch.topk(probs, 2, dim=-1).values
        return top[..., 0] - top[..., 1]
    rows = probs.detach().reshape(-1, probs.size(-1)).numpy()
    first = rows.argmax(axis=-1)
    margins = np.empty(len(rows), dtype=np.float32)
    with np.errstate(invalid="ignore"):  # a row of -inf: nan, as torch's subtraction gives it
        for r, (row, i) in enumerate(zip(rows, first, strict=True)):
            runner_up = max(row[:i].max(initial=-np.inf), row[i + 1 :].max(initial=-np.inf))
            margins[r] = row[i] - np.float32(runner_up)
    return torch.from_numpy(margins).view(probs.shape[:-1])
