"""The verification experiments, on the embedded default.

    python -m olmo_tap.verify.experiment [--part verify] [--prompts 20] [--tokens 64] [--out results/verification]
    python -m olmo_tap.verify.experiment --part audit [--n 200] [--out results/verification]
    python -m olmo_tap.verify.experiment --part quantized [--n 24] [--out results/quant]

``--part verify``: for each case, ``--prompts`` single-head responses of ``--tokens`` tokens are generated
(sampled, temperature 0.8, one seed per prompt) and checked with ``verify_outputs`` (olmo-tap's sampler)
against the *claimed* settings, under the statistical rules (token-difr's use) and the exact rule. It also
calibrates the statistical verdict on honest replays across dtypes (bf16 generation, fp32 verification) and
measures verification vs generation throughput. Writes ``results.json`` and ``results.md``.

``--part audit``: the jury's transcripts against forgeries of every kind (``olmo_tap.verify.audit_experiment``),
``audit.json`` and ``audit.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE, PoEOutput
from olmo_tap.verify.outputs import verify_outputs
from olmo_tap.verify.records import TokenMetrics, TokenSequence
from olmo_tap.verify.scoring import compute_metrics_summary
from olmo_tap.verify.verdict import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MARGIN_TOLERANCE,
    DEFAULT_THRESHOLD,
    calibrate,
    decide,
    exact_verdict,
)
from olmo_tap.weights.presets import CLONES_MODEL as DEFAULT_MODEL  # the measured runs: untrained clones
from olmo_tap.weights.tokenizer import load_tokenizer

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "Give three tips for learning a new language.",
    "What is the capital of Australia?",
    "Describe a cat to someone who has never seen one.",
    "How do plants make food?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a weekend hike?",
    "Summarise the story of Cinderella.",
    "Why do we have seasons?",
    "Suggest a name for a bakery.",
    "How does a bicycle stay upright?",
    "What are the benefits of drinking water?",
    "Write a haiku about autumn.",
    "Explain what a computer program is.",
    "Give me a recipe idea with eggs.",
    "What is the difference between weather and climate?",
    "Describe your ideal weekend.",
    "How do bees make honey?",
    "Why is exercise good for the brain?",
    "What is a black hole?",
    "List three famous painters.",
    "How can I sleep better?",
    "What does a librarian do?",
]
TEMPERATURE = 0.8


def generate(
    model: HydraTransformer, tokenizer: Any, prompts: list[str], tokens: int, mode: str, temperature: float, desc: str
) -> tuple[list[PoEOutput], float]:
    """One response per prompt (seed = prompt index + 1), fixed length; returns (outputs, seconds)."""
    decoder = PoE(model, tokenizer, max_new_tokens=tokens, mode=mode, ignore_eos=True)  # type: ignore[arg-type]
    outputs, started = [], time.perf_counter()
    for i, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt", leave=False)):
        outputs.append(decoder.generate_with_cache(prompt, temperature=temperature, seed=i + 1))
    return outputs, time.perf_counter() - started


def as_sequences(outputs: list[PoEOutput], seed_offset: int = 0) -> list[TokenSequence]:
    return [TokenSequence(o.prompt_ids, o.token_ids, o.settings["seed"] + seed_offset) for o in outputs]


def row(case: str, check: str, flags_per_sequence: list[list[bool]], verdicts: dict[str, Callable]) -> dict[str, Any]:
    """One table row: pooled agreement, and for each named verdict rule the pooled verdict and the number of
    responses it flags one by one."""
    flat = [f for flags in flags_per_sequence for f in flags]
    entry: dict[str, Any] = {"case": case, "check": check, "tokens": len(flat), "responses": len(flags_per_sequence)}
    for name, verdict_of in verdicts.items():
        pooled = verdict_of(flat)
        entry[name] = {
            "agreement_rate": pooled.agreement_rate,
            "ci": [pooled.ci_low, pooled.ci_high],
            "pooled_verdict": pooled.label,
            "responses_flagged": sum(verdict_of(flags).honest is False for flags in flags_per_sequence),
        }
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="results/verification")
    parser.add_argument(
        "--part",
        choices=["verify", "audit", "quantized"],
        default="verify",
        help="verify: verify_outputs and the pooled audit (results.md); audit: honest transcripts vs forgeries "
        "of every kind, per-position rule (audit.md, see olmo_tap.verify.audit_experiment); quantized: GGUF "
        "answers of each kernel route audited by an auditor on the other (audit_quantized.md, default --out "
        "results/quant; see olmo_tap.verify.quant_audit_experiment)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.part == "audit":
        from olmo_tap.verify import audit_experiment

        audit_experiment.main([*rest, "--model", args.model, "--out", args.out])
        return
    if args.part == "quantized":
        from olmo_tap.verify import quant_audit_experiment

        out = args.out if args.out != parser.get_default("out") else "results/quant"
        quant_audit_experiment.main([*rest, "--model", args.model, "--out", out])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    prompts = PROMPTS[: args.prompts]
    tokenizer = load_tokenizer(args.model)
    model = HydraTransformer.from_pretrained(args.model, dtype="float32", device="cpu")
    T = TEMPERATURE

    def verify(outputs: list[PoEOutput], seed_offset: int = 0, temperature: float = T) -> list[list[TokenMetrics]]:
        return verify_outputs(
            as_sequences(outputs, seed_offset), model, tokenizer=tokenizer, temperature=temperature,
            top_k=0, top_p=1.0, seed=None, sampling_method="olmo_tap", verbose=False,
        )  # fmt: skip

    # Honest single-head outputs, and the throughput of generating vs verifying them.
    honest, gen_s = generate(model, tokenizer, prompts, args.tokens, "single", T, "honest fp32")
    started = time.perf_counter()
    honest_results = verify(honest)
    verify_s = time.perf_counter() - started
    n_tokens = sum(len(o.token_ids) for o in honest)

    # Calibration: the same model in bf16 generates, fp32 verifies (the drift the library defaults tolerate);
    # and the strict rule: calibrated on honest replays in the generator's own dtype.
    bf16 = HydraTransformer.from_pretrained(args.model, dtype="bfloat16", device="cpu")
    honest_bf16, _ = generate(bf16, tokenizer, prompts, args.tokens, "single", T, "honest bf16")
    cross = calibrate(verify(honest_bf16))
    strict = calibrate(honest_results)

    def verify_row(case: str, results: list[list[TokenMetrics]]) -> dict[str, Any]:
        def rule(tolerance: float, threshold: float) -> Callable:
            return lambda per_token: decide(
                [m.exact_match or m.margin <= tolerance for m in per_token], threshold, DEFAULT_CONFIDENCE
            )

        verdicts = {
            "default": rule(DEFAULT_MARGIN_TOLERANCE, DEFAULT_THRESHOLD),
            "strict": rule(strict.margin_tolerance, strict.threshold),
        }
        entry = row(case, "verify_outputs", [list(r) for r in results], verdicts)
        entry["exact_match_rate"] = compute_metrics_summary(results)["exact_match_rate"]
        # the exact rule: every token reproduced, or a near-tie within the tolerance (0 in the generator's dtype)
        for name, tolerance in (("exact", 0.0), ("exact_cross_dtype", DEFAULT_MARGIN_TOLERANCE)):
            entry[name] = {
                "margin_tolerance": tolerance,
                "responses_flagged": sum(exact_verdict([r], tolerance).honest is False for r in results),
            }
        return entry

    rows = [
        verify_row("honest (fp32, same dtype)", honest_results),
        verify_row("honest (bf16 generation, fp32 verification)", verify(honest_bf16)),
    ]
    for t in (0.6, 1.0):
        outputs, _ = generate(model, tokenizer, prompts, args.tokens, "single", t, f"temperature {t}")
        rows.append(verify_row(f"temperature {t} claimed as {T}", verify(outputs)))
    rows.append(verify_row("another seed", verify(honest, seed_offset=1000)))
    with torch.no_grad():
        fewer = HydraTransformer.from_pretrained(args.model, dtype="float32", device="cpu")
        last = fewer.heads[-1]
        last.wo.zero_()  # the last layer adds nothing: a 29-layer model claiming to be the 30-layer one
        last.w2.zero_()
        outputs, _ = generate(fewer, tokenizer, prompts, args.tokens, "single", T, "fewer layers")
        rows.append(verify_row("one layer fewer", verify(outputs)))
        del fewer
        other = HydraTransformer.from_pretrained(args.model, dtype="float32", device="cpu")
        generator = torch.Generator().manual_seed(0)
        for p in other.heads.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=generator))
        outputs, _ = generate(other, tokenizer, prompts, args.tokens, "single", T, "other weights")
        rows.append(verify_row("other weights (2% noise on the head layers)", verify(outputs)))
        del other

    results = {
        "model": args.model,
        "prompts": len(prompts),
        "tokens_per_response": args.tokens,
        "temperature": T,
        "confidence": DEFAULT_CONFIDENCE,
        "defaults": {
            "margin_tolerance": DEFAULT_MARGIN_TOLERANCE,
            "threshold": DEFAULT_THRESHOLD,
        },
        "calibration_cross_dtype": asdict(cross),
        "calibration_same_dtype": asdict(strict),
        "throughput": {
            "generated_tokens_per_s": n_tokens / gen_s,
            "verified_tokens_per_s": n_tokens / verify_s,
            "ratio": gen_s / verify_s,
        },
        "rows": rows,
        "machine": machine(),
    }
    write_results(args.out, "results", results, markdown(results))


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and flags, threads, torch."""
    from olmo_tap.benchmarks.harness import machine_info

    info = machine_info(torch.device("cpu"))
    keep = ("platform", "cpu", "cpu_flags", "cpu_count", "torch_threads")
    return {k: info[k] for k in keep} | {"torch": torch.__version__}


def write_results(out: str | Path, stem: str, results: dict[str, Any], text: str) -> None:
    """``stem``.json and ``stem``.md (the README's table) in ``out``; the table is printed too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(text)
    print(text)


def machine_line(m: dict[str, Any]) -> str:
    return f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), {m['torch_threads']} threads, torch {m['torch']}"


def markdown(results: dict[str, Any]) -> str:
    d, c, strict, t = (
        results["defaults"],
        results["calibration_cross_dtype"],
        results["calibration_same_dtype"],
        results["throughput"],
    )
    lines = [
        f"{results['prompts']} prompts x {results['tokens_per_response']} tokens, temperature "
        f"{results['temperature']}, {results['model']} (5 heads x 3 layers), CPU fp32 unless noted. "
        "Statistical rules (token-difr's use): default: a miss within the margin tolerance "
        f"{d['margin_tolerance']} agrees, threshold {d['threshold']}; strict: calibrated on same-dtype honest "
        f"replays (tolerance {strict['margin_tolerance']:.2g}, threshold {strict['threshold']:.3f}); verdicts at "
        f"{results['confidence']:.0%} confidence, pooled over all responses. Exact rule: a response is flagged if "
        "any token is neither reproduced nor a near-tie within the tolerance (0 in the generator's dtype; "
        f"{d['margin_tolerance']} across dtypes). 'flagged' counts responses flagged one by one.",
        "",
        "| case | exact match | default: agreement / verdict / flagged | strict: verdict / flagged "
        "| exact rule, tolerance 0 / 0.3: flagged |",
        "|---|---:|---|---|---|",
    ]
    for r in results["rows"]:
        default, strict_row = r["default"], r["strict"]
        lines.append(
            f"| {r['case']} | {r['exact_match_rate']:.1%} "
            f"| {default['agreement_rate']:.1%} / {default['pooled_verdict']} / "
            f"{default['responses_flagged']}/{r['responses']} "
            f"| {strict_row['pooled_verdict']} / {strict_row['responses_flagged']}/{r['responses']} "
            f"| {r['exact']['responses_flagged']}/{r['responses']} / "
            f"{r['exact_cross_dtype']['responses_flagged']}/{r['responses']} |"
        )
    lines += [
        "",
        f"Cross-dtype calibration (bf16 generation, fp32 verification, {c['n_tokens']} tokens): exact match "
        f"{c['honest_exact_match_rate']:.2%}, largest honest miss x 2 = tolerance {c['margin_tolerance']:.3f}, "
        f"threshold {c['threshold']:.3f}.",
        f"Machine: {machine_line(results['machine'])}.",
        f"Throughput: generation {t['generated_tokens_per_s']:.1f} "
        f"tok/s (single head), verification "
        f"{t['verified_tokens_per_s']:.0f} tok/s = {t['ratio']:.1f}x generation.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
