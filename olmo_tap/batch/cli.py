"""``olmo-tap batch generate|verify|audit INPUT --output OUTPUT``: whole datasets on Ray (``olmo_tap.batch.job``).

Exit codes as the single-record commands: 0 done (verify, audit: every record honest), 1 a record flagged, 2 bad
input (with ``--on-error fail``, any bad record; else only a job that cannot start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any


def register(sub: Any, add_model_args: Callable[..., None]) -> None:
    batch = sub.add_parser(
        "batch",
        help="generate, verify or audit a whole dataset (JSONL or Parquet) on Ray: one laptop or a cluster",
        description="Runs on Ray Data: a local Ray started in-process by default, any cluster with --address or "
        "RAY_ADDRESS. Each worker (a Ray actor) holds one model. Results are written as records finish; rerunning "
        "the same command resumes the job.",
    )
    bsub = batch.add_subparsers(dest="batch_command", required=True)
    for name, help_ in (
        ("generate", "answer prompts or chat messages with the jury (one olmo-tap generate --json per record)"),
        ("verify", "check token-difr records (prompt and output token ids) against the model"),
        ("audit", "replay PoE transcripts through the jury, record by record, with a pooled verdict"),
    ):
        p = bsub.add_parser(name, help=help_)
        p.add_argument("input", help="records: .jsonl (one JSON object per line) or .parquet")
        p.add_argument("--output", required=True, help="results: .jsonl or .parquet (resumed when it exists)")
        add_model_args(p, split=name == "generate")
        group = p.add_argument_group("Ray")
        group.add_argument("--workers", type=int, default=1, help="actors, each holding one model (default 1)")
        group.add_argument(
            "--threads-per-worker",
            type=int,
            default=None,
            help="torch threads of each actor (default: cores / workers)",
        )
        group.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs of each actor (GPU clusters)")
        group.add_argument("--batch-size", type=int, default=8, help="records an actor takes at once (default 8)")
        group.add_argument("--address", default=None, help="a Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
        p.add_argument(
            "--on-error",
            choices=["skip", "fail"],
            default="skip",
            help="a bad record (reported with file and line): skip it (default) or fail the job",
        )
        p.add_argument("--json", action="store_true", help="print the job's report as JSON")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        getattr(sys.modules[__name__], f"_{name}_args")(p)
        p.set_defaults(func=cmd_batch)


def _generate_args(p: argparse.ArgumentParser) -> None:
    from olmo_tap.certainty.names import DEFAULT_SIMILARITY, SIMILARITY_NAMES

    p.add_argument("--seed", type=int, default=0, help="job seed: a record without a seed gets one derived from it")
    p.add_argument("--mode", choices=["poe", "naive", "single"], default="poe")
    p.add_argument("--temperature", type=float, default=0.0, help="as olmo-tap generate (default 0 = greedy)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--veto", type=float, default=None, help="veto threshold tau in [0, 1)")
    p.add_argument("--draft-head", type=int, default=None)
    p.add_argument(
        "--certainty",
        choices=["auto", "mcq", "kle", "off"],
        default="off",
        help="each answer's certainty (default off: KLE decodes 5 more answers per record)",
    )
    p.add_argument("--similarity", choices=SIMILARITY_NAMES, default=DEFAULT_SIMILARITY, help="KLE's similarity")
    p.add_argument(
        "--engine-batch",
        action="store_true",
        help="decode each actor's records together in the engine's batch: faster, the same tokens, but float "
        "signals from batch arithmetic (default: each record alone, byte for byte what olmo-tap generate prints)",
    )


def _verify_args(p: argparse.ArgumentParser) -> None:
    from olmo_tap.verify.cli import add_verdict_args
    from olmo_tap.verify.verdict import DEFAULT_THRESHOLD

    p.add_argument("--temperature", type=float, required=True, help="as in generation (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="generation seed (a record's own seed wins)")
    p.add_argument("--sampling-method", default="vllm_gumbel_max", choices=["vllm_gumbel_max", "olmo_tap"])
    p.add_argument("--rule", default=None, choices=["exact", "statistical"], help="as olmo-tap verify")
    p.add_argument("--head", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--margin-tolerance", type=float, default=None)
    add_verdict_args(p, DEFAULT_THRESHOLD)
    p.set_defaults(threshold=None, confidence=None)


def _audit_args(p: argparse.ArgumentParser) -> None:
    from olmo_tap.verify.cli import add_verdict_args
    from olmo_tap.verify.verdict import DEFAULT_AUDIT_THRESHOLD

    p.add_argument("--tolerance", type=float, default=None, help="as olmo-tap audit")
    add_verdict_args(p, DEFAULT_AUDIT_THRESHOLD)


def job_spec(args: argparse.Namespace) -> Any:
    """The job's ``JobSpec`` from the command line (the options the single-record command takes)."""
    from olmo_tap.batch.work import JobSpec
    from olmo_tap.cli import check_seed

    command = args.batch_command
    if command == "generate":
        check_seed(args.seed)
        from olmo_tap.batch.work import generate_options

        options = generate_options(
            mode=args.mode, temperature=args.temperature, max_new_tokens=args.max_new_tokens, gamma=args.gamma,
            beta=args.beta, veto_threshold=args.veto, draft_head=args.draft_head, certainty=args.certainty,
            similarity=args.similarity, engine_batch=args.engine_batch,
        )  # fmt: skip
    elif command == "verify":
        from olmo_tap.verify.verdict import verdict_rule

        check_seed(args.seed)
        rule = verdict_rule(args.rule, args.sampling_method, args.threshold, args.confidence)
        options = {
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "sampling_method": args.sampling_method, "rule": rule, "head": args.head,
            "max_model_len": args.max_model_len, "margin_tolerance": args.margin_tolerance,
            "threshold": args.threshold, "confidence": args.confidence,
        }  # fmt: skip
    else:
        options = {"tolerance": args.tolerance, "threshold": args.threshold, "confidence": args.confidence}
    workers = args.workers
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, workers))
    return JobSpec(
        command, str(args.model), options, dtype=args.dtype, device=args.device,
        heads=getattr(args, "heads", None), heads_depth=getattr(args, "heads_depth", None), threads=threads,
        job_seed=args.seed if command == "generate" else 0,
    )  # fmt: skip


def cmd_batch(args: argparse.Namespace) -> int:
    from olmo_tap.batch.job import run_job
    from olmo_tap.verify.cli import exit_code

    spec = job_spec(args)

    def bad(problem: Any) -> None:
        print(f"olmo-tap batch: skipping {problem.describe()}", file=sys.stderr)

    report = run_job(
        spec, args.input, args.output, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size, address=args.address, on_error=args.on_error, progress=not args.no_progress,
        report_bad=bad,
    )  # fmt: skip
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        rate = data["records_per_second"]
        print(
            f"{report.done_now} records done now, {report.done_before} before, {len(report.bad)} bad, of "
            f"{report.records}; {report.tokens} tokens in {report.seconds:.1f} s"
            + (f" ({rate:.2f} records/s, {data['tokens_per_second']:.1f} tokens/s)" if rate else "")
            + f"; results in {report.output}"
        )
        if report.summary:
            pooled = report.summary["pooled"]
            print(f"pooled over the dataset: {pooled['reason']}")
            flagged = report.summary["flagged"]
            listed = ", ".join(map(str, flagged[:20])) + (" ..." if len(flagged) > 20 else "")
            verdict = "honest" if not flagged else "NOT honest"
            print(f"verdict: {verdict}: {len(flagged)} record(s) flagged" + (f": {listed}" if flagged else ""))
    if args.batch_command == "generate":
        return 0
    return exit_code(report.honest)
