"""/v1/verify and /v1/audit as jobs for the worker thread, against the model the server already holds."""

from __future__ import annotations

from typing import Any

from olmo_tap.inference.transcript import check_transcript
from olmo_tap.jsonl import json_safe
from olmo_tap.serve.engine import Job
from olmo_tap.serve.schemas import AuditRequest, VerifyRequest
from olmo_tap.verify import TokenSequence, audit_poe, compute_metrics_summary, judge, verdict_rule, verify_outputs
from olmo_tap.verify.verdict import DEFAULT_AUDIT_THRESHOLD, DEFAULT_CONFIDENCE


def run_verify(job: Job, model: Any, tokenizer: Any, body: VerifyRequest) -> dict[str, Any]:
    """token-difr's metrics for each claimed sequence, their summary and the verdict (under ``body.rule``;
    by default exact for olmo-tap's sampler, statistical for vLLM's).

    A client that left, or the time limit, stops the work between sequences and between blocks of positions
    (``job.check_stop`` raises DeadlinePassed: a cut-short verification is an error, never a partial verdict)."""
    rule = verdict_rule(body.rule, body.sampling_method, body.threshold, body.confidence)
    outputs = [TokenSequence(s.prompt_token_ids, s.output_token_ids, s.seed) for s in body.outputs]
    results = verify_outputs(
        outputs,
        model,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        sampling_method=body.sampling_method,
        head=body.head,
        tokenizer=tokenizer,
        verbose=False,
        check_stop=job.check_stop,
    )
    verdict = judge(
        results,
        rule,
        threshold=body.threshold,
        confidence=body.confidence,
        margin_tolerance=body.margin_tolerance,
        outputs=outputs,
    )
    return json_safe(
        {
            "summary": compute_metrics_summary(results),
            "verdict": verdict.to_dict(),
            "results": [[metrics.to_dict() for metrics in sequence] for sequence in results],
        }
    )


def check_audit_request(model: Any, model_id: str, body: AuditRequest) -> dict[str, Any]:
    """The transcript, if this server's model can replay it; ValueError naming the mismatch otherwise."""
    transcript = check_transcript(body.transcript)
    settings = transcript["settings"]
    split = (model.n_heads, model.config.head_layers)
    claimed = (settings.get("n_heads", split[0]), settings.get("heads_depth", split[1]))
    if claimed != split:
        raise ValueError(
            f"the transcript's Hydra was {claimed[0]} heads x {claimed[1]} layers; this server's is "
            f"{split[0]} x {split[1]}: audit it with `olmo-tap audit`, which rebuilds that split"
        )
    return transcript


def audit_tokens(transcript: dict[str, Any]) -> int:
    """The tokens an audit of ``transcript`` replays (what the server caps): the prompt and the answer, and each
    KLE sample and attacked answer, with the prompt again (an attacked prompt's few suffix tokens aside)."""
    sides = [
        *(s["token_ids"] for s in (transcript.get("certainty") or {}).get("samples", [])),
        *(a["token_ids"] for a in (transcript.get("robustness") or {}).get("attacks", [])),
    ]
    return sum(len(transcript["prompt_ids"]) + len(ids) for ids in [transcript["token_ids"], *sides])


def run_audit(
    job: Job,
    model: Any,
    tokenizer: Any,
    model_id: str,
    transcript: dict[str, Any],
    body: AuditRequest,
    attack_bank: Any = None,
) -> dict[str, Any]:
    """The audit report of ``transcript`` against the served model (``attack_bank``: the server's, which a
    robustness record's suffixes must come from)."""
    report = audit_poe(
        transcript,
        model,
        tokenizer=tokenizer,
        attack_bank=attack_bank,
        threshold=DEFAULT_AUDIT_THRESHOLD if body.threshold is None else body.threshold,
        confidence=DEFAULT_CONFIDENCE if body.confidence is None else body.confidence,
        check_stop=job.check_stop,  # between blocks of positions: a client that left or the deadline stops it
    )
    result = report.to_dict()
    result["audited_against"] = model_id
    if transcript.get("model") not in (None, model_id):
        result["notes"] = [
            *result["notes"],
            f"the transcript names model {transcript['model']!r}; it was replayed through this server's {model_id!r}",
        ]
    return json_safe(result)
