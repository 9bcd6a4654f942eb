"""From per-token agreement to a verdict: honest or not, under one of two rules.

A token *agrees* when the verifier's own sample is the claimed token, or misses it by a margin within
``margin_tolerance`` (a near-tie): replaying in another dtype or on another device moves logits a little, so
an honest mismatch is always a near-tie, while a token from another temperature, seed or model usually loses
by a wide margin.

- The **statistical** rule (``audit``, ``decide``) is token-difr's use: detecting a substituted model from a
  provider that samples with another implementation, dtype or device. Averages alone (token-difr's summary)
  leave the user to guess a cut-off; here the decision is a test. The outputs are declared *not honest* when
  the upper end of the confidence interval of their agreement rate lies below ``threshold``, the rate honest
  replays reach. By design it tolerates a few misses: one substituted token among hundreds passes.
- The **exact** rule (``exact_verdict``) is for replays in the generator's own sampler, dtype and device class
  (``SamplingMethod.OLMO_TAP``, olmo-tap checking olmo-tap), where the replay must be exact: every token that
  is neither the verifier's sample nor a near-tie is reported as not reproduced, with its position, whatever
  the pooled rate. Its tolerance is 0 (exact) in the generator's dtype; when the dtypes differ, use a
  tolerance calibrated on honest cross-dtype replays (``DEFAULT_MARGIN_TOLERANCE``, below).

The statistical defaults are calibrated (``calibrate``) on honest replays across dtypes, bf16 generation
checked in fp32, on the embedded default (``python -m olmo_tap.verify.experiment``, README "Verification"):
98.7% of 1280 sampled tokens matched exactly, every miss was within a margin of 0.28, so the tolerance is 0.3
and the threshold 0.99 (the 99% lower bound was 0.995). The jury's audit re-takes discrete decisions, which
have no margin to tolerate: honest bf16 transcripts audited in fp32 were 97.1% consistent, so its threshold
is 0.95. Verifying in the generator's own dtype and device is exact (100%): ``calibrate`` on such replays
gives a zero tolerance and a stricter test, and ``exact_verdict`` the strictest one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

from olmo_tap.verify.records import SamplingMethod, TokenMetrics, TokenSequence

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
class NotReproduced:
    """A claimed token the replay does not reproduce: neither the verifier's own sample nor a near-tie."""

    sequence: int  # the sequence's index among the verified outputs
    index: int  # the token's index in that sequence's output
    margin: float  # how far the claimed token lost (inf: the filters removed it)
    claimed: int | None = None  # the claimed token id (when the outputs were given)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity: written as "inf", as TokenMetrics.to_dict does.
        return asdict(self) | {"margin": self.margin if math.isfinite(self.margin) else str(self.margin)}

    def describe(self) -> str:
        claimed = "" if self.claimed is None else f"claimed {self.claimed}, "
        return f"sequence {self.sequence} token {self.index}: {claimed}margin {self.margin:.3g}"


@dataclass
class Verdict:
    honest: bool | None  # None: no tokens, nothing to decide on
    agreement_rate: float | None  # fraction of tokens the replay reproduces (exactly or within the tolerance)
    ci_low: float | None  # the interval of that rate (statistical rule; None under the exact rule)
    ci_high: float | None
    confidence: float | None  # the interval's level (statistical rule; None under the exact rule)
    threshold: float  # the rate honest outputs must reach (1 under the exact rule: every token)
    n_tokens: int
    n_agreeing: int
    reason: str
    rule: str = "statistical"  # "statistical" (token-difr's test, ``audit``) or "exact" (``exact_verdict``)
    margin_tolerance: float | None = None  # the near-tie tolerance used (None: not given to ``decide``)
    n_near_ties: int | None = None  # exact rule: misses within the tolerance (counted as reproduced)
    not_reproduced: list[NotReproduced] | None = None  # exact rule: every token not reproduced, in order

    @property
    def label(self) -> str:
        return verdict_label(self.honest)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self) | {"label": self.label}
        if self.not_reproduced is not None:
            data["not_reproduced"] = [miss.to_dict() for miss in self.not_reproduced]
        return data


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
    """Honest or not, from ``verify_outputs``' results, by token-difr's statistical rule (module docstring)."""
    verdict = decide(agreeing(results, margin_tolerance), threshold, confidence)
    verdict.margin_tolerance = margin_tolerance
    return verdict


MAX_LISTED = 5  # not-reproduced tokens named in a verdict's reason (the verdict lists them all)


def exact_verdict(
    results: list[list[TokenMetrics]],
    margin_tolerance: float = 0.0,
    outputs: list[TokenSequence] | None = None,
) -> Verdict:
    """Honest or not, from ``verify_outputs``' results, by the exact rule: every token that is neither an
    exact match nor a near-tie (a miss by at most ``margin_tolerance``) is not reproduced, and one such token
    makes the outputs not honest, whatever the pooled rate. Give the verified ``outputs`` to have each
    not-reproduced token's claimed id in the verdict.

    Use it for replays in the generator's own sampler, dtype and device class (tolerance 0); when the dtypes
    differ, with a tolerance calibrated on honest cross-dtype replays (``DEFAULT_MARGIN_TOLERANCE``).
    """
    if not margin_tolerance >= 0:
        raise ValueError(f"margin_tolerance must be >= 0, got {margin_tolerance}")
    if outputs is not None and [len(o.output_token_ids) for o in outputs] != [len(seq) for seq in results]:
        raise ValueError("outputs do not match the results (one TokenSequence per sequence of metrics)")
    misses, near_ties, n = [], 0, 0
    for i, sequence in enumerate(results):
        for j, m in enumerate(sequence):
            n += 1
            if m.exact_match:
                continue
            if m.margin <= margin_tolerance:
                near_ties += 1
            else:
                claimed = None if outputs is None else outputs[i].output_token_ids[j]
                misses.append(NotReproduced(i, j, m.margin, claimed))
    k = n - len(misses)
    rate = k / n if n else None
    honest = None if n == 0 else not misses
    ties = f"{near_ties} near-tie{'s' if near_ties != 1 else ''} within the margin tolerance {margin_tolerance:g}"
    if n == 0:
        reason = "no tokens to check"
    elif misses:
        listed = "; ".join(miss.describe() for miss in misses[:MAX_LISTED])
        if len(misses) > MAX_LISTED:
            listed += f"; and {len(misses) - MAX_LISTED} more"
        reason = f"{len(misses)} of {n} tokens not reproduced ({listed})"
        if near_ties or margin_tolerance > 0:
            reason += f"; {ties}"
    elif near_ties:
        reason = f"all {n} tokens reproduced: {n - near_ties} exactly, {ties}"
    else:
        reason = f"all {n} tokens reproduced exactly"
    return Verdict(honest, rate, None, None, None, 1.0, n, k, reason, "exact", margin_tolerance, near_ties, misses)


RULES = ("exact", "statistical")


def verdict_rule(
    rule: str | None,
    sampling_method: SamplingMethod | str,
    threshold: float | None = None,
    confidence: float | None = None,
) -> str:
    """The rule to apply: ``rule``, or by default exact for olmo-tap's own sampler (the verifier shares it, so
    the replay is exact) and statistical for vLLM's (token-difr's use: another provider, another dtype).
    ValueError for an unknown rule, or a threshold or confidence (statistical knobs) given with the exact rule."""
    method = SamplingMethod.parse(sampling_method)
    default = "exact" if method is SamplingMethod.OLMO_TAP else "statistical"
    chosen = default if rule is None else rule
    if chosen not in RULES:
        raise ValueError(f"unknown verdict rule {chosen!r}; use one of: {', '.join(RULES)}")
    if chosen == "exact" and (threshold is not None or confidence is not None):
        given = " and ".join(n for n, v in (("threshold", threshold), ("confidence", confidence)) if v is not None)
        why = f" (the default for sampling method {method.value})" if rule is None else ""
        verb = "apply" if " and " in given else "applies"
        raise ValueError(
            f"{given} {verb} to the statistical rule only; the exact rule{why} reports every token not "
            "reproduced, whatever the rate: ask for the statistical rule to use them"
        )
    return chosen


def judge(
    results: list[list[TokenMetrics]],
    rule: str,
    *,
    threshold: float | None = None,
    confidence: float | None = None,
    margin_tolerance: float | None = None,
    outputs: list[TokenSequence] | None = None,
) -> Verdict:
    """The verdict under ``rule`` ("exact" or "statistical"); options left None take that rule's defaults
    (exact: tolerance 0; statistical: ``DEFAULT_THRESHOLD``, ``DEFAULT_CONFIDENCE``,
    ``DEFAULT_MARGIN_TOLERANCE``)."""
    if rule == "exact":
        verdict_rule(rule, SamplingMethod.OLMO_TAP, threshold, confidence)
        return exact_verdict(results, 0.0 if margin_tolerance is None else margin_tolerance, outputs)
    if rule != "statistical":
        raise ValueError(f"unknown verdict rule {rule!r}; use one of: {', '.join(RULES)}")
    return audit(
        results,
        DEFAULT_THRESHOLD if threshold is None else threshold,
        DEFAULT_CONFIDENCE if confidence is None else confidence,
        DEFAULT_MARGIN_TOLERANCE if margin_tolerance is None else margin_tolerance,
    )


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
