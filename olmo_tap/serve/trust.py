"""The ``trust`` objects a response carries, built from what PoE reports (TokenEvent, PoEOutput).

Per token (each streamed chunk, and ``trust.tokens`` of a whole answer): its text and id, the entropy of the
distribution it was decided from (nats), its stability radius and margin, and, when the jury rejected the
draft, the rejected draft, its validity radius and suppression score.

Per answer: whether the jury certified it or abstained, acceptance statistics, the lowest stability, its
``certainty`` (``olmo_tap.certainty.method``: the uncertainty head's p(correct) for multiple choice, Kernel
Language Entropy over sampled answers for free text, or none with the reason), its ``security`` summary (the
risk tier below), ``robustness`` (``olmo_tap.robustness.probe``: the share of adversarial suffixes that left the
answer as it was, with the attacked answers; or none with the reason), every setting needed to replay it, and the
transcript itself (the JSON ``olmo-tap audit`` checks) with its digest; when the server has a signing key,
the transcript carries its Ed25519 signature and ``signed_by`` the key's fingerprint.

Security risk tier (``security_summary``), from the validity radii of the tokens the jury resampled (each: the
fewest verifier votes that, flipped, would have let the rejected draft through; at most ``V // 2 + 1`` with V
verifiers): "low" when their mean is at least ``LOW_RISK`` of that maximum, "moderate" at least
``MODERATE_RISK``, else "high" (the original's 4 and 2 on its 0-5 scale); "low" too when the jury accepted
every draft. No tier (null, with the reason) for an answer the jury did not decide or a jury of identical heads.
"""

from __future__ import annotations

from typing import Any

from olmo_tap.inference.poe import PoEOutput, TokenEvent
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.robustness.probe import NOT_REQUESTED, unavailable

# How a response ended, in OpenAI's vocabulary; trust.finish_reason keeps olmo-tap's own word.
OPENAI_FINISH = {"eos": "stop", "length": "length", "abstain": "content_filter", "time_limit": "length"}


def token_trust(event: TokenEvent) -> dict[str, Any]:
    """A streamed token's trust fields: those of ``trust.tokens``; its log-probabilities go in OpenAI's
    ``logprobs`` instead."""
    trust = event.to_dict()
    del trust["logprob"], trust["top_logprobs"]
    return trust


def resampled_from_output(output: PoEOutput) -> list[dict[str, Any]]:
    """The rejected drafts of an answer, each with the index of the token that replaced it."""
    return [
        {
            "index": part - 1,  # resampled_idxs index output_parts, whose [0] is the prompt
            "draft_token_id": draft_id,
            "draft_text": draft_text,
            "validity_radius": radius,
            "suppression_score": score,
        }
        for part, draft_text, draft_id, radius, score in zip(
            output.resampled_idxs,
            output.original_tokens,
            output.original_token_ids,
            output.validity_radii,
            output.suppression_scores,
            strict=True,
        )
    ]


def tokens_from_output(output: PoEOutput) -> list[dict[str, Any]]:
    """Per-token trust of a finished answer (the same fields as the streamed TokenEvents)."""
    no_draft = {"draft_token_id": None, "draft_text": None, "validity_radius": None, "suppression_score": None}
    drafts = {r.pop("index"): r for r in resampled_from_output(output)}
    return [
        {
            "index": i,
            "position": len(output.prompt_ids) + i,
            "token_id": token_id,
            "text": output.output_parts[i + 1],
            "entropy": output.token_entropies[i],
            "stability_radius": output.stability_radii[i],
            "stability_margin": output.stability_margins[i],
            "resampled": i in drafts,
            **drafts.get(i, no_draft),
        }
        for i, token_id in enumerate(output.token_ids)
    ]


LOW_RISK, MODERATE_RISK = 0.8, 0.4
ROBUSTNESS_UNAVAILABLE = unavailable(NOT_REQUESTED)  # a request that did not ask for the probe


def max_validity_radius(n_verifiers: int) -> int:
    """The largest validity radius V verifiers can give: all of them against the draft (V // 2 + 1 flips)."""
    return n_verifiers // 2 + 1


def security_summary(output: PoEOutput) -> dict[str, Any]:
    """The Security card: mean validity radius of the resampled tokens, its scale, and the risk tier (rule in
    the module's docstring)."""
    radii = output.validity_radii
    top = max_validity_radius(len(output.verifier_heads))
    mean = sum(radii) / len(radii) if radii else None
    summary = {"mean_validity_radius": mean, "max_validity_radius": top, "n_resampled": len(radii)}
    if output.mode != "poe" or not output.whole_jury:
        return {**summary, "risk": None, "reason": "not decided by the whole jury"}
    if not output.independent_heads:
        return {**summary, "risk": None, "reason": "a jury of identical heads guards against nothing"}
    if mean is None:
        return {**summary, "risk": "low", "reason": "the jury accepted every draft"}
    risk = "low" if mean >= LOW_RISK * top else "moderate" if mean >= MODERATE_RISK * top else "high"
    return {**summary, "risk": risk, "reason": f"mean validity radius {mean:.2f} of at most {top}"}


def response_trust(
    output: PoEOutput,
    model_id: str,
    *,
    certainty: dict[str, Any],
    queue_s: float,
    signing_key: Any = None,
    robustness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``trust`` object of a whole answer (non-streamed responses and the last streamed chunk); with
    ``signing_key`` (an Ed25519PrivateKey) its transcript is signed. ``certainty``: the answer's certainty
    object (``olmo_tap.certainty.method.CertaintyPlan``); a KLE certainty goes into the transcript too.
    ``robustness``: the probe's record (None: not asked for); a measured one goes into the transcript too."""
    settings = output.settings
    robustness = ROBUSTNESS_UNAVAILABLE if robustness is None else robustness
    transcript = transcript_dict(output, model_id, certainty, robustness)
    signed_by = None
    if signing_key is not None:
        from olmo_tap.verify.signing import sign_transcript

        transcript = sign_transcript(transcript, signing_key)
        signed_by = transcript["signature"]["fingerprint"]
    n = len(output.token_ids)
    return {
        "mode": output.mode,
        # The whole jury of independent heads decided every token and ended the answer on its own terms.
        "certified": output.certified,
        "verdict": output.verdict,  # the card's words: never more than the weights deliver
        "whole_jury": output.whole_jury,
        "independent_heads": output.independent_heads,
        "abstained": output.abstained,
        "finish_reason": output.finish_reason,
        "n_tokens": n,
        "acceptance": {
            "rate": output.acceptance_rate,
            "n_drafted": output.n_drafted,
            "n_accepted": output.n_accepted,
            "n_rounds": output.n_rounds,
            "tokens_per_round": output.tokens_per_round,
        },
        "n_resampled": len(output.resampled_idxs),
        "min_stability_radius": min(output.stability_radii) if n else None,
        "mean_entropy": sum(output.token_entropies) / n if n else None,
        "max_entropy": max(output.token_entropies) if n else None,
        "mcq": certainty.get("method") == "uncertainty_head",
        "p_correct": output.uncertainty,
        "certainty": certainty,
        "security": security_summary(output),
        "robustness": robustness,
        "seed": settings.get("seed"),
        "draft_head": output.draft_head,
        "verifier_heads": output.verifier_heads,
        "settings": settings,
        "elapsed_s": output.elapsed_s,
        "queue_s": queue_s,
        "tokens_per_second": output.tokens_per_second,
        "tokens": tokens_from_output(output),
        "resampled": resampled_from_output(output),
        "digest": transcript["digest"],
        "signed_by": signed_by,
        "transcript": transcript,
    }
