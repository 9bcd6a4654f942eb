"""Verifiable outputs: token-difr compatible verification on any device, verdicts, and the PoE audit."""

from olmo_tap.verify.outputs import verify_outputs
from olmo_tap.verify.poe_audit import PoEAudit, PositionCheck, audit_poe
from olmo_tap.verify.records import (
    SamplingMethod,
    TokenMetrics,
    TokenSequence,
    read_token_sequences,
)
from olmo_tap.verify.scoring import compute_metrics_summary
from olmo_tap.verify.verdict import (
    DEFAULT_AUDIT_THRESHOLD,
    DEFAULT_MARGIN_TOLERANCE,
    DEFAULT_THRESHOLD,
    Calibration,
    NotReproduced,
    Verdict,
    audit,
    calibrate,
    exact_verdict,
    judge,
    verdict_rule,
    wilson_interval,
)

__all__ = [
    "DEFAULT_AUDIT_THRESHOLD",
    "DEFAULT_MARGIN_TOLERANCE",
    "DEFAULT_THRESHOLD",
    "Calibration",
    "NotReproduced",
    "PoEAudit",
    "PositionCheck",
    "SamplingMethod",
    "TokenMetrics",
    "TokenSequence",
    "Verdict",
    "audit",
    "audit_poe",
    "calibrate",
    "compute_metrics_summary",
    "exact_verdict",
    "judge",
    "read_token_sequences",
    "verdict_rule",
    "verify_outputs",
    "wilson_interval",
]
