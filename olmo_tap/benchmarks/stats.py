"""Statistics of timings: Tukey outlier filtering, summaries, and the per-position view of a streamed generation.

Pure functions on plain lists (no torch), so they can be checked on known inputs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

# Tukey's fences: values beyond 1.5 interquartile ranges outside the quartiles are outliers.
TUKEY_K = 1.5
# Quartiles of fewer values than this say too little to call anything an outlier.
MIN_VALUES_TO_FILTER = 4


def iqr_filter(values: Sequence[float], k: float = TUKEY_K) -> list[float]:
    """``values`` without those outside [Q1 - k·IQR, Q3 + k·IQR] (quartiles by linear interpolation),
    in their original order. Fewer than MIN_VALUES_TO_FILTER values are returned unchanged."""
    values = [float(v) for v in values]
    if len(values) < MIN_VALUES_TO_FILTER:
        return values
    q1, q3 = np.percentile(values, [25, 75])
    low, high = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    return [v for v in values if low <= v <= high]


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Summary of ``values`` after outlier filtering: n (kept), n_outliers, median, mean, stdev (0 for one
    value), min, max, p10, p90. Raises ValueError on an empty input."""
    if len(values) == 0:
        raise ValueError("cannot summarise an empty list of values")
    kept = iqr_filter(values)
    return {
        "n": len(kept),
        "n_outliers": len(values) - len(kept),
        "median": statistics.median(kept),
        "mean": statistics.fmean(kept),
        "stdev": statistics.stdev(kept) if len(kept) > 1 else 0.0,
        "min": min(kept),
        "max": max(kept),
        "p10": float(np.percentile(kept, 10)),
        "p90": float(np.percentile(kept, 90)),
    }


def amortised_latencies(arrivals_ms: Sequence[float], round_sizes: Sequence[int]) -> list[float | None]:
    """Per-token decode latency: each round's time (from the previous round's last arrival to its own last
    arrival) shared equally among the tokens it emitted. Tokens of the first round are None: their time is
    the time to first token, prefill included. For a plain decoder (rounds of one token) this is the gap
    between consecutive tokens."""
    if sum(round_sizes) != len(arrivals_ms):
        raise ValueError(f"round sizes add up to {sum(round_sizes)} but there are {len(arrivals_ms)} arrivals")
    if any(size < 1 for size in round_sizes):
        raise ValueError(f"every round emits at least one token, got sizes {list(round_sizes)}")
    latencies: list[float | None] = []
    end = 0  # index one past the previous round's last token
    for size in round_sizes:
        if end == 0:
            latencies.extend([None] * size)
        else:
            share = (arrivals_ms[end + size - 1] - arrivals_ms[end - 1]) / size
            latencies.extend([share] * size)
        end += size
    return latencies


def decode_tokens_per_second(arrivals_ms: Sequence[float], first_round_size: int) -> float | None:
    """Tokens after the first round divided by the time they took (prefill and first round excluded);
    None when the first round emitted everything."""
    rest = len(arrivals_ms) - first_round_size
    if rest <= 0:
        return None
    elapsed_ms = arrivals_ms[-1] - arrivals_ms[first_round_size - 1]
    return 1000.0 * rest / elapsed_ms if elapsed_ms > 0 else math.inf


def per_position_median(rows: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Position-wise median over runs (after outlier filtering), ignoring None; None where no run has a value."""
    if not rows:
        return []
    width = max(len(r) for r in rows)
    medians: list[float | None] = []
    for i in range(width):
        column = [r[i] for r in rows if i < len(r) and r[i] is not None]
        medians.append(statistics.median(iqr_filter(column)) if column else None)  # type: ignore[arg-type]
    return medians
