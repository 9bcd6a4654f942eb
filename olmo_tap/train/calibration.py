"""How well predicted probabilities of "correct" match what happened: ECE, Brier score, AUROC, a reliability diagram.

Definitions (p_i: predicted probability that answer i is correct, y_i in {0, 1}: whether it was):

- Expected calibration error: ``n_bins`` equal-width bins over [0, 1] (bin b holds
  ``b/n <= p < (b+1)/n``, the last bin also p = 1); ``ECE = sum_b (|B_b| / N) * |mean(y in B_b) - mean(p in B_b)|``.
- Brier score: ``mean((p_i - y_i)^2)``.
- AUROC: the probability that a random correct answer gets a higher p than a random wrong one, ties
  counting one half (the Mann-Whitney U statistic over n_pos * n_neg); undefined (None) when all
  answers are correct or all wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _arrays(probs: Sequence[float], labels: Sequence[int | bool]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape or p.size == 0:
        raise ValueError(f"need two equally long, non-empty lists; got {p.shape} probabilities and {y.shape} labels")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError("probabilities must lie in [0, 1]")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("labels must be 0 or 1")
    return p, y


def bin_indices(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(probs: Sequence[float], labels: Sequence[int | bool], n_bins: int = 10) -> float:
    p, y = _arrays(probs, labels)
    bins = bin_indices(p, n_bins)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.sum() / p.size * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def brier_score(probs: Sequence[float], labels: Sequence[int | bool]) -> float:
    p, y = _arrays(probs, labels)
    return float(np.mean((p - y) ** 2))


def auroc(probs: Sequence[float], labels: Sequence[int | bool]) -> float | None:
    p, y = _arrays(probs, labels)
    return score_auroc(p, y)


def score_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int | bool] | np.ndarray) -> float | None:
    """P(a positive's score > a negative's), ties counting half (the Mann-Whitney U statistic); any real scores.
    None when one class is absent."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def reliability_bins(probs: Sequence[float], labels: Sequence[int | bool], n_bins: int = 10) -> list[dict[str, Any]]:
    """Per bin: its range, count, mean confidence and accuracy (None for an empty bin)."""
    p, y = _arrays(probs, labels)
    bins = bin_indices(p, n_bins)
    rows = []
    for b in range(n_bins):
        mask = bins == b
        rows.append(
            {
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "count": int(mask.sum()),
                "confidence": float(p[mask].mean()) if mask.any() else None,
                "accuracy": float(y[mask].mean()) if mask.any() else None,
            }
        )
    return rows


def calibration_report(probs: Sequence[float], labels: Sequence[int | bool], n_bins: int = 10) -> dict[str, Any]:
    p, y = _arrays(probs, labels)
    return {
        "n": int(p.size),
        "accuracy": float(y.mean()),
        "mean_confidence": float(p.mean()),
        "ece": expected_calibration_error(p, y, n_bins),
        "brier": brier_score(p, y),
        "auroc": auroc(p, y),
        "bins": reliability_bins(p, y, n_bins),
    }


def plot_reliability(reports: dict[str, dict[str, Any]], path: str | Path, title: str = "Reliability diagram") -> Path:
    """Reliability diagram (accuracy against confidence per bin, one series per report) and a count histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    n_series = max(len(reports), 1)
    for i, (name, report) in enumerate(reports.items()):
        bins = [b for b in report["bins"] if b["count"]]
        label = f"{name} (ECE {report['ece']:.3f}, Brier {report['brier']:.3f})"
        top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=label)
        width = (report["bins"][0]["high"] - report["bins"][0]["low"]) / n_series
        centres = [b["low"] + width * (i + 0.5) for b in report["bins"]]
        bottom.bar(centres, [b["count"] for b in report["bins"]], width=width, label=name)
    top.set_ylabel("fraction correct")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("predicted p(correct)")
    bottom.set_ylabel("answers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
