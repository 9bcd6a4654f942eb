"""``olmo-tap verify`` (token-difr style records) and ``olmo-tap audit`` (a PoE transcript)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from olmo_tap.model.config import ConfigError
from olmo_tap.weights.errors import WeightsError

# Exit codes: 0 honest, 1 not honest (or inconclusive), 2 bad input (olmo_tap.cli.main).
EXIT_NOT_HONEST = 1


def register(sub: Any, add_model_args: Callable[..., None]) -> None:
    from olmo_tap.verify.verdict import DEFAULT_AUDIT_THRESHOLD, DEFAULT_THRESHOLD

    verify = sub.add_parser(
        "verify",
        help="check claimed outputs (token ids) against a trusted model: token-difr metrics and a verdict",
        description="Replays TokenSequence records (JSONL: prompt_token_ids, output_token_ids, optional seed) "
        "through the model and reports how many claimed tokens its own sampler reproduces. "
        "Exit code 0: honest, 1: not honest, 2: bad input.",
    )
    verify.add_argument("outputs", help="JSONL file of TokenSequence records")
    add_model_args(verify, split=False)
    verify.add_argument("--temperature", type=float, required=True, help="as in generation (0 = greedy)")
    verify.add_argument("--top-k", type=int, default=0, help="as in generation (<= 0: off, the default)")
    verify.add_argument("--top-p", type=float, default=1.0, help="as in generation (1: off, the default)")
    verify.add_argument("--seed", type=int, default=None, help="generation seed (a record's own seed wins)")
    verify.add_argument(
        "--sampling-method",
        default="vllm_gumbel_max",
        choices=["vllm_gumbel_max", "olmo_tap"],
        help="the generator's sampler: vLLM's (token-difr, default) or olmo-tap's own (its default rule is exact)",
    )
    verify.add_argument(
        "--rule",
        default=None,
        choices=["exact", "statistical"],
        help="the verdict's rule. exact (default for --sampling-method olmo_tap: the replay shares the "
        "generator's sampler, dtype and device class): any token not reproduced (neither the verifier's sample "
        "nor a near-tie within --margin-tolerance, default 0) makes the outputs not honest, and is listed with "
        "its position; --threshold and --confidence do not apply (an error if given). statistical (default for "
        "vllm_gumbel_max: token-difr's use, another provider or dtype): a test of the pooled agreement rate",
    )
    verify.add_argument("--head", type=int, default=None, help="for a saved ensemble: the head to verify against")
    verify.add_argument("--max-model-len", type=int, default=None, help="refuse longer sequences")
    verify.add_argument("--metrics-out", default=None, help="write per-token metrics as JSONL here")
    add_verdict_args(verify, DEFAULT_THRESHOLD)
    verify.set_defaults(threshold=None, confidence=None)  # None: the statistical defaults, unless given
    verify.add_argument(
        "--margin-tolerance",
        type=float,
        default=None,
        help="a miss by at most this logit margin still agrees (numerical drift). Default: 0 with the exact "
        "rule; 0.3 with the statistical one (calibrated on bf16 generation verified in fp32, also the value "
        "for the exact rule across dtypes)",
    )
    verify.add_argument("--json", action="store_true", help="print summary and verdict as JSON")
    verify.set_defaults(func=cmd_verify)

    audit = sub.add_parser(
        "audit",
        help="check that a saved response really went through the jury (replays every decision)",
        description="Replays a transcript written by `olmo-tap generate --save` (or the chat service) in one "
        "teacher-forced pass of the trunk and every head, re-taking each decision of the jury. "
        "Exit code 0: honest, 1: not honest, 2: bad input.",
    )
    audit.add_argument("transcript", help="transcript JSON file")
    add_model_args(audit, split=False)
    audit.add_argument(
        "--model-from-transcript",
        action="store_true",
        help="replay through the model the transcript names instead of --model (it may be any path or hub id: "
        "only for transcripts you trust that far)",
    )
    add_verdict_args(audit, DEFAULT_AUDIT_THRESHOLD)
    audit.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="nats a decision may be off and count as a near-tie (default: 0 when replayed in the generator's "
        "dtype and device class, else the calibrated cross-dtype tolerance)",
    )
    audit.add_argument(
        "--public-key",
        default=None,
        help="Ed25519 public key (PEM, or the base64 a transcript embeds) of the server that must have signed it",
    )
    audit.add_argument(
        "--attack-bank",
        default=None,
        metavar="PATH",
        help="the attack bank a robustness record's suffixes must come from (default: the one shipped for --model)",
    )
    audit.add_argument("--positions", action="store_true", help="list every position, not only disagreements")
    audit.add_argument("--json", action="store_true", help="print the full audit report as JSON")
    audit.set_defaults(func=cmd_audit)


def add_verdict_args(parser: argparse.ArgumentParser, threshold: float) -> None:
    from olmo_tap.verify.verdict import DEFAULT_CONFIDENCE

    group = parser.add_argument_group("verdict")
    group.add_argument(
        "--threshold",
        type=float,
        default=threshold,
        help=f"agreement rate honest replays reach (default {threshold})",
    )
    group.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"confidence level of the interval (default {DEFAULT_CONFIDENCE})",
    )


def exit_code(honest: bool | None) -> int:
    return 0 if honest else EXIT_NOT_HONEST


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from olmo_tap.cli import check_seed, check_writable
    from olmo_tap.jsonl import write_jsonl
    from olmo_tap.verify.outputs import verify_outputs
    from olmo_tap.verify.records import read_token_sequences
    from olmo_tap.verify.scoring import compute_metrics_summary
    from olmo_tap.verify.verdict import judge, verdict_rule

    rule = verdict_rule(args.rule, args.sampling_method, args.threshold, args.confidence)
    check_seed(args.seed)
    if args.metrics_out:  # before the replay: a bad path should not cost a model load and a pass per record
        check_writable(args.metrics_out, "--metrics-out", creates_parents=True)
    sequences = read_token_sequences(args.outputs)
    results = verify_outputs(
        sequences,
        args.model,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        device=args.device,
        sampling_method=args.sampling_method,
        head=args.head,
        verbose=not args.json,
    )
    if args.metrics_out:
        write_jsonl(
            args.metrics_out,
            ({"sequence": i, "token": j, **m.to_dict()} for i, seq in enumerate(results) for j, m in enumerate(seq)),
        )
    summary = compute_metrics_summary(results)
    verdict = judge(
        results,
        rule,
        threshold=args.threshold,
        confidence=args.confidence,
        margin_tolerance=args.margin_tolerance,
        outputs=sequences,
    )
    if args.json:
        print(json.dumps({"summary": summary, "verdict": verdict.to_dict(), "sequences": len(results)}, indent=2))
        return exit_code(verdict.honest)
    table = Table(title=f"{len(results)} sequences, {summary['total_tokens']} tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    misses, shown = verdict.not_reproduced or [], 50  # --json lists every one
    for miss in misses[:shown]:
        console.print(f"  not reproduced: {miss.describe()}", highlight=False)
    if len(misses) > shown:
        console.print(f"  ... and {len(misses) - shown} more (--json lists them all)", highlight=False)
    console.print(f"[bold]verdict: {verdict.label}[/bold] ({verdict.rule} rule) - {verdict.reason}", highlight=False)
    if args.metrics_out:
        console.print(f"per-token metrics written to {args.metrics_out}")
    return exit_code(verdict.honest)


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from olmo_tap.inference.transcript import read_transcript
    from olmo_tap.jsonl import json_safe
    from olmo_tap.verify.poe_audit import audit_poe

    public_key = None
    if args.public_key is not None:
        from olmo_tap.verify.signing import load_public_key

        public_key = load_public_key(args.public_key)
    transcript = read_transcript(args.transcript)
    # The weights to replay through are the auditor's choice: a transcript naming a model must not make us load it.
    model = transcript.get("model") if args.model_from_transcript else args.model
    if model is None:
        raise ValueError("the transcript names no model: pass --model")
    bank = None
    if transcript.get("robustness") is not None:
        from olmo_tap.robustness.probe import resolve_bank

        # the suffixes must be the bank's: the auditor's bank, or the one shipped for the model replayed through
        bank = resolve_bank(args.attack_bank, model)
    try:
        report = audit_poe(
            transcript,
            model,
            tolerance=args.tolerance,
            public_key=public_key,
            threshold=args.threshold,
            confidence=args.confidence,
            dtype=args.dtype,
            device=args.device,
            attack_bank=bank,
        )
    except (ConfigError, WeightsError) as e:
        named = transcript.get("model")
        if not isinstance(named, str) or named == model:
            raise
        # e.g. the default preset cannot be split as the transcript's model was: say which model that was
        raise type(e)(
            f"{e} (replaying through --model {model!r}; the transcript names model {named!r}: pass --model with "
            "the weights it was generated by, or --model-from-transcript if you trust the transcript that far)"
        ) from e
    if args.json:
        print(json.dumps(json_safe(report.to_dict()), indent=2))
        return exit_code(report.honest)
    console = Console(highlight=False)
    s = report.settings
    console.print(
        f"mode {s['mode']}, seed {s['seed']}, temperature {s['temperature']}, beta {s['beta']}, "
        f"veto {s['veto_threshold']}, draft head {s['draft_head']} of {s['n_llm_heads']} text heads"
    )
    console.print(f"digest {report.digest}")
    console.print(f"replayed through {model} ({report.settings.get('dtype', '?')} transcript)")
    if transcript.get("model") not in (None, model):
        console.print(f"note: the transcript names model {transcript['model']!r}")
    rule = "exact replay" if report.exact else f"near-ties within {report.tolerance:g} nats explained"
    console.print(f"rule: every decision must be reproduced ({rule})")
    shown = report.positions if args.positions else [p for p in report.positions if not p.consistent]
    for p in shown:
        mark = "ok " if p.consistent else "BAD"
        expected = "abstain" if p.expected_token_id is None else p.expected_token_id
        extra = "" if p.draft_token_id is None else f", draft {p.draft_token_id}"
        if p.expected_resampled is not None:
            extra += f", replay {'resamples' if p.expected_resampled else 'accepts'}"
            extra += f", transcript {'resampled' if p.claimed_resampled else 'accepted'}"
        console.print(
            f"  {mark} token {p.index} (position {p.position}): emitted {p.token_id}, replay {expected}{extra}; "
            f"{p.decision} slack {p.slack:.3g}, margin {p.margin:.3g} nats"
        )
    for mismatch in report.field_mismatches:
        console.print(f"  BAD {mismatch}")
    console.print(f"ending: {report.ending} ({'consistent' if report.ending_consistent else 'INCONSISTENT'})")
    if report.signature is not None:
        sig = report.signature
        console.print(f"signature: {sig.get('fingerprint') or 'none'} - {sig.get('reason')}")
    if report.certainty is not None:
        mark = "ok" if report.certainty.honest else "BAD"
        console.print(f"certainty (KLE): {mark} - {report.certainty.reason}")
    if report.robustness is not None:
        mark = "ok" if report.robustness.honest else "BAD"
        console.print(f"robustness (adversarial suffixes): {mark} - {report.robustness.reason}")
    console.print(f"pooled agreement (information, not the rule): {report.statistics.reason}")
    for note in report.notes:
        console.print(f"note: {note}")
    console.print("text (the decoding of the audited ids):")
    console.print(report.text, markup=False)
    console.print(f"[bold]verdict: {report.label}[/bold] - {report.reason}")
    return exit_code(report.honest)


def write_token_sequence(path: str, prompt_ids: list[int], token_ids: list[int], seed: int | None) -> None:
    """Append one TokenSequence record (what ``olmo-tap verify`` reads) to a JSONL file."""
    from olmo_tap.verify.records import TokenSequence

    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(TokenSequence(prompt_ids, token_ids, seed).to_dict()) + "\n")
