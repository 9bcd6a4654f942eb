"""From per-token agreement to a verdict: honest or not, with a confidence interval and the evidence size.

Averages alone (token-difr's summary) leave the user to guess a cut-off. Here the decision is a test. A token
*agrees* when the verifier's own sample is the claimed token, or misses it by a margin within
``margin_tolerance``: replaying in another dtype or on another device moves logits a little, so an honest
mismatch is always a near-tie, while a token from another temperature, seed or model usually loses by a wide
margin. The outputs are declared *not honest* when the upper end of the confidence interval of their
agreement rate lies below ``threshold``, the rate honest replays reach.

The defaults are calibrated (``calibrate``) on honest replays across dtypes, bf16 generation checked in
fp32, on the embedded default (``python -m olmo_tap.verify.experiment``, README "Verification"): 98.7% of
1280 sampled tokens matched exactly, every miss was within a margin of 0.28, so the tolerance is 0.3 and the
threshold 0.99 (the 99% lower bound was 0.995). The jury's audit re-takes discrete decisions, which have no
margin to tolerate: honest bf16 transcripts audited in fp32 were 97.1% consistent, so its threshold is 0.95.
Verifying in the generator's own dtype and device is exact (100%): ``calibrate`` on such replays gives a
zero tolerance and a stricter test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

from olmo_tap.verify.records import TokenMetrics

DEFAULT_THRESHOLD = 0.99
DEFAULT_MARGIN_TOLERANCE = 0.3
DEFAULT_AUDIT_THRESHOLD = 0.95
DEFAULT_CONFIDENCE = 0.99


def verdict_label(honest: bool | None) -> str:
    return {True: "honest", False: "NOT honest", None: "inconclusive"}[honest]


def wilson_interval(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Two-sided Wilson score interval of a binomial rate (well-behaved at 0% and 100%, unlike the normal one)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Verdict:
    honest: bool | None  # None: no tokens, nothing to decide on
    agreement_rate: float | None  # fraction of tokens the replay reproduces
    ci_low: float
    ci_high: float
    confidence: float
    threshold: float
    n_tokens: int
    n_agreeing: int
    reason: str

    @property
    def label(self) -> str:
        return verdict_label(self.honest)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}


def decide(
    agreeing: list[bool], threshold: float = DEFAULT_THRESHOLD, confidence: float = DEFAULT_CONFIDENCE
) -> Verdict:
    """The verdict on per-token agreement flags (see module docstring for the rule)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n, k = len(agreeing), sum(bool(a) for a in agreeing)
    low, high = wilson_interval(k, n, confidence)
    if n == 0:
        return Verdict(None, None, low, high, confidence, threshold, 0, 0, "no tokens to check")
    rate = k / n
    honest = high >= threshold
    relation = "reaches" if honest else "is below"
    reason = (
        f"{k}/{n} tokens agree ({rate:.1%}); the {confidence:.0%} interval [{low:.1%}, {high:.1%}] "
        f"{relation} the honest threshold {threshold:.1%}"
    )
    return Verdict(honest, rate, low, high, confidence, threshold, n, k, reason)


def agreeing(results: list[list[TokenMetrics]], margin_tolerance: float = DEFAULT_MARGIN_TOLERANCE) -> list[bool]:
    """Per-token agreement flags: an exact match, or a miss by at most ``margin_tolerance`` (a near-tie)."""
    if margin_tolerance < 0:
        raise ValueError(f"margin_tolerance must be >= 0, got {margin_tolerance}")
    return [m.exact_match or m.margin <= margin_tolerance for sequence in results for m in sequence]


def audit(
    results: list[list[TokenMetrics]],
    threshold: float = DEFAULT_THRESHOLD,
    confidence: float = DEFAULT_CONFIDENCE,
    margin_tolerance: float = DEFAULT_MARGIN_TOLERANCE,
) -> Verdict:
    """Honest or not, from ``verify_outputs``' results (see the module docstring for the rule)."""
    return decide(agreeing(results, margin_tolerance), threshold, confidence)


@dataclass
class Calibration:
    margin_tolerance: float
    threshold: float
    n_tokens: int
    honest_exact_match_rate: float


def calibrate(
    honest_results: list[list[TokenMetrics]], confidence: float = DEFAULT_CONFIDENCE, slack: float = 2.0
) -> Calibration:
    """Tolerance and threshold from honest replays (pick them to cover the drift you accept: another dtype,
    device or batch size than the verifier's).

    The tolerance is ``slack`` times the largest margin of an honest mismatch; the threshold is the lower end
    of the confidence interval of the honest agreement rate under that tolerance, so honest outputs fail the
    test only when their agreement is implausibly low for honest replays.
    """
    tokens = [m for sequence in honest_results for m in sequence]
    if not tokens:
        raise ValueError("calibration needs honest results with at least one token")
    misses = [m.margin for m in tokens if not m.exact_match and math.isfinite(m.margin)]
    tolerance = slack * max(misses, default=0.0)
    flags = agreeing(honest_results, tolerance)
    low, _ = wilson_interval(sum(flags), len(flags), confidence)
    exact = sum(m.exact_match for m in tokens) / len(tokens)
    return Calibration(tolerance, low, len(tokens), exact)
