"""The audit experiment: honest transcripts vs forgeries of every kind, on the embedded default.

    python -m olmo_tap.verify.experiment --part audit [--n 200] [--exact-only] [--out results/verification]

Honest transcripts: ``--n`` jury answers (PoE) to distinct prompts, cycling greedy / sampled (T 0.8), veto off /
on (tau 1e-3) and 16 / 32 / 48 new tokens, generated in fp32 and again in bf16, on the untrained clones preset
(the runs in results/verification/). The fp32 ones are audited in fp32 (the generator's own dtype: tolerance 0)
and forged in every way a forger would try; the bf16 ones are audited in bf16 (same dtype again) and in fp32:
the first half calibrates the cross-dtype tolerance (twice the largest honest slack), the second half measures
false alarms and single-token edits at that tolerance. ``--exact-only`` runs the same-dtype rows the exact rule
decides (honest transcripts and single-token edits, fp32 and bf16) and writes ``audit_exact.{json,md}``;
``--cross-only`` runs only the cross-dtype rows and writes ``audit_cross.{json,md}``.

A single-token substitution is counted as caught by the decision rule only if it is caught under both claims a
forger could make at the edited position: "the draft was accepted" and "the replay's own draft was rejected
and this token resampled". Writes ``audit.json`` and ``audit.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.jury import jury_distribution
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.transcript import transcript_dict
from olmo_tap.verify import forgery
from olmo_tap.verify.experiment import machine, machine_line, write_results
from olmo_tap.verify.poe_audit import PoEAudit, audit_poe
from olmo_tap.verify.replay import teacher_forced_logits
from olmo_tap.weights.presets import CLONES_MODEL as DEFAULT_MODEL  # the measured runs: untrained clones
from olmo_tap.weights.tokenizer import load_tokenizer

TOPICS = [
    "the sea", "volcanoes", "honey bees", "the moon", "bicycles", "libraries", "rainbows", "penguins", "chess",
    "bread", "glaciers", "trains", "owls", "coffee", "deserts", "music", "the heart", "maps", "clouds", "tea",
    "whales", "gardens", "bridges", "the sun", "snow", "robots", "ants", "rivers", "forests", "kites",
    "clocks", "dolphins", "cheese", "mountains", "lightning", "paper", "bats", "salt", "islands", "wolves",
    "candles", "frogs", "apples", "caves", "boats", "storms", "butterflies", "castles", "rice", "horses",
    "stars", "mushrooms", "tigers", "lakes", "windmills", "pianos", "spiders", "soap", "comets", "camels",
    "parrots", "umbrellas", "coral reefs", "tides", "sheep", "lanterns", "pepper", "earthquakes", "foxes", "ink",
    "hedgehogs", "oranges", "telescopes", "waterfalls", "beeswax", "sailing", "puzzles", "seeds", "fog", "marbles",
]  # fmt: skip
TEMPLATES = [
    "Tell me one fact about {}.",
    "Write two sentences about {}.",
    "Why do people like {}?",
    "Describe {} to a child.",
    "What is surprising about {}?",
]
CONFIGS = [  # (temperature, veto threshold, new tokens), cycled over the prompts
    (t, tau, n) for t in (0.0, 0.8) for tau in (None, 1e-3) for n in (16, 32, 48)
]
SEED = 20261130


def prompts(n: int) -> list[str]:
    every = [template.format(topic) for template in TEMPLATES for topic in TOPICS]
    if n > len(every):
        raise ValueError(f"--n is at most {len(every)}")
    return random.Random(SEED).sample(every, n)


def generate(model: HydraTransformer, tokenizer: Any, texts: list[str], desc: str, **kwargs: Any) -> list[dict]:
    transcripts = []
    for i, text in enumerate(tqdm(texts, desc=desc, unit="answer")):
        temperature, tau, tokens = CONFIGS[i % len(CONFIGS)]
        decoder = PoE(model, tokenizer, max_new_tokens=tokens, veto_threshold=tau, seed=i + 1, **kwargs)
        output = decoder.generate_with_cache(text, temperature=temperature)
        transcripts.append(transcript_dict(output, DEFAULT_MODEL))
    return transcripts


def audit(transcript: dict, model: HydraTransformer, tokenizer: Any, **kwargs: Any) -> PoEAudit | None:
    """The audit, or None where the forged claim cannot even be replayed (refused as bad input: caught)."""
    try:
        return audit_poe(transcript, model, tokenizer=tokenizer, **kwargs)
    except ValueError:
        return None


def runner_up(model: HydraTransformer, transcript: dict, j: int) -> int:
    """The jury's most probable token at emitted index j other than the emitted one: the most plausible edit."""
    s = transcript["settings"]
    n = s["n_llm_heads"]
    verifiers = [h for h in range(n) if h != s["draft_head"]]
    logits = teacher_forced_logits(model, transcript["prompt_ids"], transcript["token_ids"][: j + 1], verifiers)
    target, _ = jury_distribution(logits[:, j:, : s["vocab_limit"]], max(s["temperature"], 1e-3), s["beta"], None)
    ranked = torch.argsort(target[0], descending=True).tolist()
    return next(t for t in ranked if t != transcript["token_ids"][j])


def substitution_caught(
    transcript: dict, honest: PoEAudit, j: int, token: int, model: HydraTransformer, tokenizer: Any, **kwargs: Any
) -> dict[str, Any]:
    """A substitution at j under both claims a forger could make there; caught only if both fail."""
    accepted = forgery.substitute(transcript, tokenizer, j, token)
    _claim(accepted, j, None)
    reports = [audit(accepted, model, tokenizer, **kwargs)]
    draft = honest.positions[j].draft_token_id
    if draft is not None and draft != token:
        rejected = forgery.substitute(transcript, tokenizer, j, token)
        _claim(rejected, j, draft)
        reports.append(audit(rejected, model, tokenizer, **kwargs))
    return {
        "caught": all(r is None or not r.honest for r in reports),
        "caught_by_decisions": all(r is None or r.inconsistent_positions for r in reports),
        "near_tie": honest.positions[j].margin <= honest.tolerance if honest.tolerance > 0 else False,
        "margin": honest.positions[j].margin,
    }


def _claim(transcript: dict, j: int, draft: int | None) -> None:
    """Make the transcript claim, at emitted index j, an accepted draft (draft None) or a rejected ``draft``."""
    output = transcript["output"]
    pairs = dict(zip(output["resampled_idxs"], output["original_token_ids"], strict=True))
    pairs.pop(j + 1, None)
    if draft is not None:
        pairs[j + 1] = draft
    output["resampled_idxs"] = sorted(pairs)
    output["original_token_ids"] = [pairs[p] for p in output["resampled_idxs"]]


def rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=200, help="honest transcripts per dtype")
    parser.add_argument("--others", type=int, default=60, help="answers of other decoders claimed as the jury's")
    parser.add_argument("--out", default="results/verification")
    parser.add_argument(
        "--exact-only",
        action="store_true",
        help="only the same-dtype rows that the exact rule decides (honest and single-token edits, fp32 and bf16); "
        "writes audit_exact.{json,md}",
    )
    parser.add_argument(
        "--cross-only",
        action="store_true",
        help="only the cross-dtype rows: --n bf16 transcripts audited in fp32, the first half calibrating the "
        "tolerance, the second half measured; writes audit_cross.{json,md}",
    )
    args = parser.parse_args(argv)
    if args.exact_only and args.cross_only:
        parser.error("--exact-only and --cross-only exclude each other")
    started = time.perf_counter()
    texts = prompts(args.n)
    rng = random.Random(SEED)
    tokenizer = load_tokenizer(args.model)
    fp32 = HydraTransformer.from_pretrained(args.model, dtype="float32", device="cpu")
    vocab = fp32.base_config.vocab_size
    not_id = tokenizer.encode(" not", add_special_tokens=False)[0]

    same_dtype = not args.cross_only
    honest = generate(fp32, tokenizer, texts, "honest fp32") if same_dtype else []
    honest_audits = [audit(t, fp32, tokenizer) for t in tqdm(honest, desc="audit honest fp32")]
    rows: list[dict[str, Any]] = []
    if same_dtype:
        rows.append(_row("honest", "fp32 -> fp32", [not a.honest for a in honest_audits], honest=True))
    same_dtype_near_ties = sum(p.margin == 0 for a in honest_audits for p in a.positions)

    def forge_all(kind: str, make: Callable[[dict, PoEAudit], dict | None], where: str = "fp32 -> fp32") -> None:
        flags, by_decisions = [], []
        for t, h in tqdm(list(zip(honest, honest_audits, strict=True)), desc=kind):
            forged = make(t, h)
            if forged is None:
                continue
            report = audit(forged, fp32, tokenizer)
            flags.append(report is None or not report.honest)
            by_decisions.append(report is None or bool(report.inconsistent_positions) or not report.ending_consistent)
        rows.append(_row(kind, where, flags, by_decisions))

    def substitutions(
        kind: str, pick: Callable[[dict, PoEAudit], tuple[int, int]], transcripts, audits, model=None, **kw
    ):
        results = []
        for t, h in tqdm(list(zip(transcripts, audits, strict=True)), desc=kind):
            if not t["token_ids"]:
                continue
            j, token = pick(t, h)
            results.append(substitution_caught(t, h, j, token, model or fp32, tokenizer, **kw))
        return results

    def random_edit(t: dict, h: PoEAudit) -> tuple[int, int]:
        j = rng.randrange(len(t["token_ids"]))
        return j, forgery.random_other_token(rng, t["settings"]["vocab_limit"], t["token_ids"][j])

    def harmful_edit(t: dict, h: PoEAudit) -> tuple[int, int]:
        j = min(range(len(h.positions)), key=lambda i: h.positions[i].margin)  # the closest call
        return j, runner_up(fp32, t, j)

    for kind, pick in (("token substituted (random position, random token)", random_edit),
                       ("token substituted (closest call, jury's runner-up)", harmful_edit)):  # fmt: skip
        if same_dtype:
            rows.append(_substitution_row(kind, "fp32 -> fp32", substitutions(kind, pick, honest, honest_audits)))

    def every_other_forgery() -> None:
        """Insertions, deletions, truncations, prompt, settings, signal and text edits; other decoders."""

        def pos(t: dict) -> int:
            return rng.randrange(len(t["token_ids"]))

        n_tokens = lambda t: len(t["token_ids"])  # noqa: E731
        forge_all(
            '" not" inserted', lambda t, h: forgery.insert(t, tokenizer, pos(t), [not_id]) if n_tokens(t) else None
        )
        forge_all("token deleted", lambda t, h: forgery.delete(t, tokenizer, pos(t)) if n_tokens(t) > 1 else None)
        forge_all("truncated to half", lambda t, h: forgery.truncate(t, tokenizer, n_tokens(t) // 2))

        def prompt_edit(t: dict, h: PoEAudit) -> dict:
            j = rng.randrange(len(t["prompt_ids"]))
            return forgery.change_prompt(t, tokenizer, j, forgery.random_other_token(rng, vocab, t["prompt_ids"][j]))

        forge_all("prompt token changed", prompt_edit)
        settings_edits = {
            "seed": lambda s: s["seed"] + 1,
            "temperature": lambda s: 0.7 if s["temperature"] == 0 else 0.6,
            "beta": lambda s: 2.0,
            "veto_threshold": lambda s: 1e-3 if s["veto_threshold"] is None else None,
            "draft_head": lambda s: (s["draft_head"] + 1) % s["n_llm_heads"],
            "n_llm_heads": lambda s: s["n_llm_heads"] - 1,
        }
        for name, value in settings_edits.items():
            forge_all(
                f"setting changed: {name}",
                lambda t, h, name=name, value=value: forgery.change_setting(t, tokenizer, name, value(t["settings"])),
            )
        forge_all(
            "signal changed: an entropy",
            lambda t, h: forgery.change_output(
                t, "token_entropies", (j := pos(t)), t["output"]["token_entropies"][j] + 0.5
            ) if n_tokens(t) else None,
        )  # fmt: skip
        forge_all(
            "count changed: n_accepted",
            lambda t, h: forgery.change_output(t, "n_accepted", None, t["output"]["n_accepted"] + 1),
        )
        forge_all(
            "text changed: one piece",
            lambda t, h: forgery.change_output(t, "output_parts", pos(t) + 1, " PWNED") if n_tokens(t) else None,
        )  # fmt: skip

        # Other decoders' answers presented as the jury's. The embedded default's heads are clones (one head's
        # answer then *is* the jury's), so these rows use a jury whose heads differ: independent noise of 5% of each
        # weight's std on every head. Smaller sets: each needs generations of its own.
        distinct = _noisy(args.model, seed=1)
        subset = texts[: args.others]
        jury = generate(distinct, tokenizer, subset, "distinct jury")

        def claimed_as_jury(transcripts: list[dict], kind: str, judge: HydraTransformer) -> None:
            flags, by_decisions = [], []
            for t, original in zip(transcripts, jury, strict=True):
                forged = copy.deepcopy(t)
                forged["settings"] = copy.deepcopy(original["settings"])
                forged["output"].update(
                    {name: original["output"][name] for name in ("mode", "draft_head", "verifier_heads")},
                    resampled_idxs=[], original_tokens=[], original_token_ids=[], validity_radii=[],
                    suppression_scores=[],
                )  # fmt: skip
                forged = forgery.restamp(forged, tokenizer)
                report = audit(forged, judge, tokenizer)
                flags.append(report is None or not report.honest)
                by_decisions.append(
                    report is None or bool(report.inconsistent_positions) or not report.ending_consistent
                )
            rows.append(_row(kind, "fp32 -> fp32, distinct heads", flags, by_decisions))

        jury_audits = [audit(t, distinct, tokenizer) for t in jury]
        rows.append(_row("honest", "fp32 -> fp32, distinct heads", [not a.honest for a in jury_audits], honest=True))
        for mode in ("single", "naive"):
            others = generate(distinct, tokenizer, subset, mode, mode=mode, draft_head=None)
            claimed_as_jury(others, f"{mode} decoder's answer claimed as the jury's", distinct)
        claimed_as_jury(jury, "the distinct jury's answer claimed for the embedded default (other weights)", fp32)
        del distinct
        forge_all("seed changed, digest left as it was", lambda t, h: _stale_digest_edit(t))

    def across_dtypes(cross: list[dict]) -> dict[str, Any]:
        """bf16 generation, fp32 audit: the first half calibrates the tolerance, the second half is measured."""
        half = len(cross) // 2
        probe = [audit(t, fp32, tokenizer, tolerance=math.inf) for t in tqdm(cross[:half], desc="calibrate")]
        slacks = [p.slack for a in probe for p in a.positions]
        tolerance = _round_up(2 * max(slacks, default=0.0))
        signal_drift = _signal_drift(cross[:half], probe)
        signal_tolerance = _round_up(2 * max(signal_drift.values(), default=0.0))
        held_out = cross[half:]
        kw = dict(tolerance=tolerance, signal_tolerance=signal_tolerance)
        held_audits = [audit(t, fp32, tokenizer, **kw) for t in tqdm(held_out, desc="audit bf16 -> fp32")]
        where = f"bf16 -> fp32 (tolerance {tolerance:g})"
        rows.append(_row("honest", where, [not a.honest for a in held_audits], honest=True))
        for kind, pick in (("token substituted (random position, random token)", random_edit),
                           ("token substituted (closest call, jury's runner-up)", harmful_edit)):  # fmt: skip
            rows.append(_substitution_row(kind, where, substitutions(kind, pick, held_out, held_audits, **kw)))
        return {
            "calibration": {
                "transcripts": half,
                "positions": len(slacks),
                "honest_mismatches": sum(s > 0 for s in slacks),
                "largest_honest_slack_nats": max(slacks, default=0.0),
                "tolerance_nats": tolerance,
                "largest_signal_drift": signal_drift,
                "signal_tolerance": signal_tolerance,
            },
            "held_out_near_ties": {
                "positions": sum(len(a.positions) for a in held_audits),
                "near_ties": sum(a.near_ties for a in held_audits),
            },
        }

    if not args.exact_only and same_dtype:
        every_other_forgery()
    # Same dtype in bf16, then across dtypes: bf16 generation, fp32 audit.
    bf16 = HydraTransformer.from_pretrained(args.model, dtype="bfloat16", device="cpu")
    cross = generate(bf16, tokenizer, texts, "honest bf16")
    # Same dtype in bf16: the block replay rounds in bf16 where the generator rounded elsewhere, so here the
    # generator run again (olmo_tap.verify.regenerate) settles what the block replay cannot.
    bf16_audits = [audit(t, bf16, tokenizer) for t in tqdm(cross if same_dtype else [], desc="audit bf16 -> bf16")]
    if same_dtype:
        rows.append(_row("honest", "bf16 -> bf16", [not a.honest for a in bf16_audits], honest=True))
        for kind, pick in (("token substituted (random position, random token)", random_edit),
                           ("token substituted (closest call, jury's runner-up)", harmful_edit)):  # fmt: skip
            results = substitutions(kind, pick, cross, bf16_audits, model=bf16)
            rows.append(_substitution_row(kind, "bf16 -> bf16", results))
    del bf16
    results: dict[str, Any] = {}
    if not args.exact_only:
        results.update(across_dtypes(cross))
    results.update({
        "model": args.model,
        "n_honest_per_dtype": args.n,
        "n_other_decoders": 0 if args.exact_only else args.others,
        "configs": [{"temperature": t, "veto_threshold": tau, "max_new_tokens": n} for t, tau, n in CONFIGS],
        "same_dtype_exact_ties": same_dtype_near_ties,
        # honest same-dtype audits whose block replay disagreed somewhere, settled by running the generator again
        "regenerated_honest": {
            "fp32": sum(a.regeneration is not None for a in honest_audits),
            "bf16": sum(a.regeneration is not None for a in bf16_audits),
        },
        "rows": rows,
        "minutes": (time.perf_counter() - started) / 60,
        "machine": machine(),
    })  # fmt: skip
    name = "audit_exact" if args.exact_only else "audit_cross" if args.cross_only else "audit"
    write_results(args.out, name, results, markdown(results))


def _noisy(model: str, seed: int, scale: float = 0.05) -> HydraTransformer:
    """The embedded default with independent noise (``scale`` x each weight's std) on every head: heads that differ."""
    hydra = HydraTransformer.from_pretrained(model, dtype="float32", device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hydra.heads.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=generator))
    return hydra


def _stale_digest_edit(transcript: dict) -> dict:
    """The naive forger: edits a setting in a text editor and leaves everything else as it was."""
    forged = copy.deepcopy(transcript)
    forged["settings"]["seed"] += 1
    return forged


def _round_up(x: float) -> float:
    """Two significant digits, rounded up (a tolerance must not shrink by rounding)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / scale) * scale


def _signal_drift(transcripts: list[dict], audits: list[PoEAudit]) -> dict[str, float]:
    """The largest honest difference of each float signal between the bf16 generator and the fp32 replay."""
    drift: dict[str, float] = {}
    for t, a in zip(transcripts, audits, strict=True):
        replayed = a.replayed_output.to_dict()
        for name in ("token_entropies", "stability_margins", "suppression_scores"):
            for g, v in zip(t["output"][name], replayed[name], strict=False):
                drift[name] = max(drift.get(name, 0.0), abs(g - v))
    return drift


def _row(
    kind: str, where: str, flags: list[bool], by_decisions: list[bool] | None = None, honest: bool = False
) -> dict[str, Any]:
    row = {"kind": kind, "replay": where, "n": len(flags), "honest_input": honest}
    row["false_alarm_rate" if honest else "caught_rate"] = rate(flags)
    if by_decisions is not None:
        row["caught_by_decisions_rate"] = rate(by_decisions)
    return row


def _substitution_row(kind: str, where: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    row = _row(kind, where, [r["caught"] for r in results], [r["caught_by_decisions"] for r in results])
    clear = [r for r in results if not r["near_tie"]]
    row["edits_at_near_ties"] = len(results) - len(clear)
    row["caught_by_decisions_rate_not_near_tie"] = rate([r["caught_by_decisions"] for r in clear])
    return row


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of honest and forged rows (``_row``, ``_substitution_row``)."""
    fmt = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    lines = [
        "| forgery | replay | n | false alarms / caught | caught by decisions | not near-tie: caught by decisions |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        main = fmt(r.get("false_alarm_rate", r.get("caught_rate")))
        lines.append(
            f"| {r['kind']} | {r['replay']} | {r['n']} | {main} | {fmt(r.get('caught_by_decisions_rate'))} "
            f"| {fmt(r.get('caught_by_decisions_rate_not_near_tie'))} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    c = results.get("calibration")
    lines = [
        f"{results['n_honest_per_dtype']} honest jury transcripts per dtype on {results['model']} (5 heads x 3 "
        "layers, untrained clones), greedy and T 0.8, veto off and 1e-3, 16/32/48 new tokens; CPU. "
        "A forgery is caught when the audit's verdict is not honest (or the claim is refused as bad input); "
        "'by decisions' counts only the per-position rule and the ending, not the field checks. Substitutions "
        "are counted as caught by decisions only if both claims a forger could make at that position fail.",
        "",
        *rows_table(results["rows"]),
    ]
    regen = results["regenerated_honest"]
    lines.append("")
    if any(r["replay"].endswith(("-> fp32", "-> bf16")) for r in results["rows"]):
        lines.append(
            f"Same-dtype replays: tolerance 0; honest audits whose block replay parted from the generator somewhere "
            f"and were settled by running the generator again: {regen['fp32']} of {results['n_honest_per_dtype']} "
            f"in fp32, {regen['bf16']} of {results['n_honest_per_dtype']} in bf16."
        )
    if c is not None:
        drift = ", ".join(f"{k} {v:.3g}" for k, v in c["largest_signal_drift"].items())
        lines += [
            f"Calibration (bf16 generation, fp32 audit, {c['transcripts']} transcripts, {c['positions']} positions): "
            f"{c['honest_mismatches']} decisions not reproduced exactly, the largest slack "
            f"{c['largest_honest_slack_nats']:.3g} nats; tolerance = 2 x that = {c['tolerance_nats']:g} nats. "
            f"Largest signal drift: {drift} "
            f"-> signal tolerance 2 x the largest = {c['signal_tolerance']:g}.",
            f"Held-out cross-dtype positions that were near-ties: {results['held_out_near_ties']['near_ties']} of "
            f"{results['held_out_near_ties']['positions']}.",
        ]
    lines += [
        f"Run time {results['minutes']:.0f} min on {machine_line(results['machine'])}.",
    ]
    return "\n".join(lines) + "\n"
