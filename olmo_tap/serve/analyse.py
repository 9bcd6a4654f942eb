"""``POST /api/analyse``: the original system's endpoint (msc-ai-mmmjo/tap, ``app/backend/server.py``), so its React
front end can be pointed at ``olmo-tap serve``.

Request: ``{"messages": [{"role", "content"}, ...]}`` (the last turn is the user's question), and olmo-tap's
optional ``"robustness": false`` to skip the robustness probe. The answer is decoded by the jury with certainty
``auto`` (multiple choice: the uncertainty head; free text: KLE with its claim ledger) and, as in the original,
the robustness probe (3 more answers with adversarial suffixes). Response, field by field as the original's
(``types/api.ts``):

- ``claims``: ``[{"text", "confidence", "confidence_level", "guidance"}]`` from the KLE samples (empty when the
  answer has none: a multiple-choice answer, or KLE that failed); ``overall_confidence``: their mean or null;
- ``uncertainty``: ``{"overall": certainty value or null}``;
- ``security``: ``{"certified", "tokens", "resampled": [{"index", "old_token", "new_token", "severity",
  "validity_radius", "suppression_score"}], "token_entropies", "stability_radii", "stability_margins"}``;
  ``certified`` is what the weights deliver (false for a jury of identical heads), not merely "PoE ran";
- ``robustness``: ``{"type": "mcq" | "nlp", "attempts", "flipped", "worst_case": {"suffix", "clean_response",
  "adv_response", "flipped", "score"} | null}`` (``olmo_tap.robustness.probe``; free text is the original's
  ``"nlp"``, which its front end's captions read), plus olmo-tap's fields (``value``, ``attacks``, ``bank``, ...);
  or ``{"type": "unavailable", "reason"}`` (no attack bank, the jury abstained, ``robustness: false``);
- ``raw_response``, ``model``, ``is_mcq`` (the detector's verdict on the last user message).

What olmo-tap cannot fill is null, and ``olmo_tap.unavailable`` says why (the original wrote a placeholder 1.0
for ``severity``); ``olmo_tap.trust`` is the full trust object of ``/v1/chat/completions`` (transcript included).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from olmo_tap.inference.poe import PoEOutput
from olmo_tap.robustness.probe import FREE_TEXT
from olmo_tap.serve.schemas import ChatMessage, RequestModel

SEVERITY_UNAVAILABLE = "per-shard reliability weights (a rejected draft's severity) are not part of olmo-tap"


# The original's word for free text, which its front end reads.
ORIGINAL_TYPES = {FREE_TEXT: "nlp"}


class AnalyseRequest(RequestModel):
    messages: list[ChatMessage] = Field(min_length=1)
    robustness: bool = Field(default=True, strict=True)  # olmo-tap's: false skips the probe's 3 attacked answers


def analyse_body(output: PoEOutput, trust: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The original's response for an answer and its trust object."""
    certainty = trust["certainty"]
    stop_ids = set(output.settings.get("stop_ids") or [])
    n = len(output.token_ids)
    while n and output.token_ids[n - 1] in stop_ids:  # the end-of-text token is not part of the shown answer
        n -= 1
    parts = output.output_parts[1 : n + 1]
    resampled = [
        {
            "index": r["index"],
            "old_token": r["draft_text"].strip(),
            "new_token": parts[r["index"]].strip(),
            "severity": None,
            "validity_radius": r["validity_radius"],
            "suppression_score": r["suppression_score"],
        }
        for r in trust["resampled"]
        if r["index"] < n
    ]
    robustness = trust["robustness"]
    unavailable = {"security.resampled[].severity": SEVERITY_UNAVAILABLE}
    if robustness["type"] == "unavailable":
        unavailable["robustness"] = robustness["reason"]
    if certainty.get("value") is None:
        unavailable["uncertainty.overall"] = certainty.get("reason")
    claims = certainty.get("claims") or []
    if not claims:
        unavailable["claims"] = (
            "claims are scored against the KLE samples; this answer has none"
            if certainty.get("method") != "kle"
            else certainty.get("reason") or "the answer has no claim to score"
        )
    return {
        "claims": claims,
        "overall_confidence": certainty.get("overall_confidence"),
        "uncertainty": {"overall": certainty.get("value")},
        "security": {
            "certified": output.certified,
            "tokens": [p.strip() for p in parts],
            "resampled": resampled,
            "token_entropies": output.token_entropies[:n],
            "stability_radii": output.stability_radii[:n],
            "stability_margins": output.stability_margins[:n],
        },
        "robustness": {**robustness, "type": ORIGINAL_TYPES.get(robustness["type"], robustness["type"])},
        "raw_response": output.text,
        "model": model_id,
        "is_mcq": certainty["detected_mcq"],
        "olmo_tap": {"unavailable": unavailable, "trust": trust},
    }
