"""``olmo-tap experiment signals``: what the trust signals are worth, on questions with known answers.

Held-out short-answer questions (``olmo_tap.train.facts``, the half never trained on) are answered greedily by:

- ``base``: the model as released (the clones preset), one head: what SmolLM2 answers without a jury;
- ``single``: one trained head alone (head ``i mod 5`` for question i, so every head is measured);
- ``naive``: the trained heads' logits averaged every step;
- ``jury``: PoE speculative verification over the trained heads, with the veto (tau ``--veto``).

Every answer is marked right or wrong by the rule in ``olmo_tap.train.facts`` and keeps its signals: mean and max
token entropy, the mean and lowest probability of its tokens (each decoder's own confidence; for ``single`` the
baseline an ensemble must beat), the lowest stability radius and margin, the acceptance rate, the number of
resamples and abstention. A signal's worth is the AUROC of its *suspicion* (the direction in which it flags a
wrong answer, e.g. high entropy, low margin) for the wrong answers, with a 95% bootstrap interval; and the
risk-coverage curve: accuracy when only the most trusted x% are answered.

The uncertainty head is measured on held-out multiple-choice questions (generated with a seed the training never
used; any question text that also appears in the training sets is dropped): ECE, Brier and AUROC of p(correct).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE, PoEOutput
from olmo_tap.train.calibration import calibration_report, plot_reliability, score_auroc
from olmo_tap.train.facts import Fact, fact_mcqs, is_correct, split_facts
from olmo_tap.train.mcq import MCQ, format_mcq, generate_mcqs, parse_choice
from olmo_tap.weights.presets import CLONES_MODEL, DEFAULT_MODEL
from olmo_tap.weights.tokenizer import load_tokenizer

DECODERS = ("base", "single", "naive", "jury")
MCQ_HELD_OUT = (240, 13)  # (questions, seed): a seed no training run uses
BOOTSTRAP = 2000
# signal -> (how it is read from an answer, +1 if a higher value is more suspicious else -1)
SIGNALS: dict[str, tuple[Callable[[PoEOutput, list[float]], float], int]] = {
    "mean entropy": (lambda o, lp: _mean(o.token_entropies), +1),
    "max entropy": (lambda o, lp: max(o.token_entropies, default=0.0), +1),
    "mean token probability": (lambda o, lp: _mean([math.exp(x) for x in lp]), -1),
    "min token probability": (lambda o, lp: min((math.exp(x) for x in lp), default=1.0), -1),
    "min stability margin": (lambda o, lp: min(o.stability_margins, default=1.0), -1),
    "min stability radius": (lambda o, lp: min(o.stability_radii, default=0), -1),
    "acceptance rate": (lambda o, lp: o.acceptance_rate if o.acceptance_rate is not None else 1.0, -1),
    "resamples": (lambda o, lp: len(o.resampled_idxs), +1),
    "abstained": (lambda o, lp: float(o.abstained), +1),
}
# Signals that say nothing for a decoder (a single head has no votes, no drafts; only the jury drafts or vetoes).
NOT_FOR = {
    "base": {"min stability radius", "acceptance rate", "resamples", "abstained"},
    "single": {"min stability radius", "acceptance rate", "resamples", "abstained"},
    "naive": {"acceptance rate", "resamples", "abstained"},
    "jury": set(),
}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@dataclass
class Answer:
    decoder: str
    question: str
    text: str
    correct: bool
    signals: dict[str, float]


def decoders(jury: HydraTransformer, base: HydraTransformer, tokenizer: Any, veto: float, max_new_tokens: int):
    """name -> (question index -> decoder). Greedy everywhere; log-probabilities on for the confidence signals."""
    common = dict(max_new_tokens=max_new_tokens, seed=0, top_logprobs=0)
    plain = PoE(base, tokenizer, n_llm_heads=base.n_text_heads, mode="single", head=0, **common)
    heads = [PoE(jury, tokenizer, mode="single", head=h, **common) for h in range(jury.n_text_heads)]
    naive = PoE(jury, tokenizer, mode="naive", **common)
    poe = PoE(jury, tokenizer, veto_threshold=veto, **common)
    return {
        "base": lambda i: plain,
        "single": lambda i: heads[i % len(heads)],
        "naive": lambda i: naive,
        "jury": lambda i: poe,
    }


def answer(decoder: PoE, prompt: str, name: str, question: str, correct: Callable[[str], bool]) -> Answer:
    stream = decoder.stream(prompt, temperature=0)
    logprobs = [e.logprob for e in stream if e.logprob is not None and math.isfinite(e.logprob)]
    output = stream.output
    signals = {s: float(read(output, logprobs)) for s, (read, _) in SIGNALS.items() if s not in NOT_FOR[name]}
    return Answer(name, question, output.text, correct(output.text) and not output.abstained, signals)


def bootstrap_auroc(
    suspicion: np.ndarray, wrong: np.ndarray, rng: np.random.Generator
) -> tuple[float, float] | tuple[None, None]:
    """95% percentile interval of the AUROC over resampled answer sets (undefined draws skipped)."""
    values = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, wrong.size, wrong.size)
        value = score_auroc(suspicion[idx], wrong[idx])
        if value is not None:
            values.append(value)
    if not values:
        return None, None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def margin_interval(
    jury: list[Answer], jury_signal: str, single: list[Answer], single_signal: str, seed: int = 0
) -> tuple[float, float] | tuple[None, None]:
    """95% paired bootstrap interval of AUROC(jury's signal) - AUROC(single head's signal): both decoders answered
    the same questions, so each draw resamples questions, not answers (tighter than two separate intervals)."""
    if len(jury) != len(single) or any(j.question != s.question for j, s in zip(jury, single, strict=False)):
        raise ValueError("the paired interval needs both decoders' answers to the same questions, in order")
    rng = np.random.default_rng(seed)
    sides = []
    for answers, signal in ((jury, jury_signal), (single, single_signal)):
        direction = SIGNALS[signal][1]
        sides.append(
            (direction * np.array([a.signals[signal] for a in answers]), np.array([not a.correct for a in answers]))
        )
    values = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, len(jury), len(jury))
        pair = [score_auroc(suspicion[idx], wrong[idx]) for suspicion, wrong in sides]
        if None not in pair:
            values.append(pair[0] - pair[1])
    if not values:
        return None, None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def signal_table(answers: list[Answer], seed: int = 0) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    wrong = np.array([not a.correct for a in answers], dtype=np.float64)
    table = {}
    for name, (_, direction) in SIGNALS.items():
        if name not in answers[0].signals:
            continue
        suspicion = direction * np.array([a.signals[name] for a in answers], dtype=np.float64)
        value = score_auroc(suspicion, wrong)
        low, high = bootstrap_auroc(suspicion, wrong, rng) if value is not None else (None, None)
        table[name] = {"auroc": value, "ci95": [low, high]}
    return table


def best_signal(table: dict[str, dict[str, Any]]) -> str:
    """The signal with the highest AUROC (undefined when every answer is right, or every one wrong: then the first
    signal stands in)."""
    return max(table, key=lambda s: -1.0 if table[s]["auroc"] is None else table[s]["auroc"])


def risk_coverage(answers: list[Answer], signal: str) -> list[dict[str, float]]:
    """Accuracy of the most trusted x% of answers by ``signal``, for x = 10%, 20%, ..., 100%."""
    direction = SIGNALS[signal][1]
    ranked = sorted(answers, key=lambda a: direction * a.signals[signal])  # least suspicious first
    curve = []
    for tenth in range(1, 11):
        kept = ranked[: max(1, round(len(ranked) * tenth / 10))]
        curve.append({"coverage": tenth / 10, "accuracy": sum(a.correct for a in kept) / len(kept)})
    return curve


FACT_MCQ_HELD_OUT_SEED = 2


def held_out_mcqs() -> list[MCQ]:
    """Multiple-choice questions no training run saw: generated ones (any whose text and choices a training set
    also has are dropped), then the held-out facts as multiple choice."""
    from olmo_tap.train.default_jury import MCQ_TRAIN, uncertainty_questions

    seen = {format_mcq(q) for q in generate_mcqs(*MCQ_TRAIN) + uncertainty_questions()}
    generated = [q for q in generate_mcqs(*MCQ_HELD_OUT) if format_mcq(q) not in seen]
    return generated + fact_mcqs(split_facts()[1], FACT_MCQ_HELD_OUT_SEED)


def run_signals(
    out: str | Path = "results/signals",
    *,
    model: str = DEFAULT_MODEL,
    base_model: str = CLONES_MODEL,
    n_questions: int | None = None,
    n_mcq: int | None = None,
    veto: float = 1e-3,
    max_new_tokens: int = 24,
    progress: bool = True,
) -> dict[str, Any]:
    started = time.perf_counter()
    tokenizer = load_tokenizer(model)
    jury = HydraTransformer.from_pretrained(model, dtype="float32", device="cpu", progress=progress)
    base = HydraTransformer.from_pretrained(base_model, dtype="float32", device="cpu", progress=progress)
    _, facts = split_facts()
    facts = facts[:n_questions] if n_questions else facts
    pick = decoders(jury, base, tokenizer, veto, max_new_tokens)
    answers: dict[str, list[Answer]] = {name: [] for name in DECODERS}
    for i, fact in enumerate(tqdm(facts, desc="held-out questions", unit="q", disable=not progress)):
        for name in DECODERS:
            answers[name].append(
                answer(pick[name](i), fact.prompt, name, fact.question, lambda t, f=fact: is_correct(f, t))
            )
    results: dict[str, Any] = {"model": model, "base_model": base_model, "veto": veto, "questions": len(facts)}
    results["by_kind"] = _by_kind(facts, answers)
    results["decoders"] = {}
    for name in DECODERS:
        table = signal_table(answers[name])
        best = best_signal(table)
        results["decoders"][name] = {
            "accuracy": sum(a.correct for a in answers[name]) / len(facts),
            "signals": table,
            "best_signal": best,
            "risk_coverage": risk_coverage(answers[name], best),
        }
    best = {name: results["decoders"][name]["best_signal"] for name in ("jury", "single")}
    value = {name: results["decoders"][name]["signals"][best[name]]["auroc"] for name in best}
    results["margin"] = {
        "jury_signal": best["jury"],
        "single_signal": best["single"],
        "value": None if None in value.values() else value["jury"] - value["single"],
        "ci95": list(margin_interval(answers["jury"], best["jury"], answers["single"], best["single"])),
    }
    results["uncertainty_head"] = _uncertainty_head(jury, tokenizer, n_mcq, progress)
    results["answers"] = {name: [a.__dict__ for a in answers[name]] for name in DECODERS}
    results["minutes"] = (time.perf_counter() - started) / 60
    from olmo_tap.verify.experiment import machine

    results["machine"] = machine()
    _write(Path(out), results)
    return results


def _by_kind(facts: list[Fact], answers: dict[str, list[Answer]]) -> dict[str, dict[str, float]]:
    kinds = sorted({f.kind for f in facts})
    return {
        kind: {
            name: sum(a.correct for f, a in zip(facts, answers[name], strict=True) if f.kind == kind)
            / sum(f.kind == kind for f in facts)
            for name in DECODERS
        }
        for kind in kinds
    }


def _uncertainty_head(jury: HydraTransformer, tokenizer: Any, n_mcq: int | None, progress: bool) -> dict[str, Any]:
    """Calibration of p(correct) on the held-out multiple choice, overall and per source (generated questions;
    facts), with the letters the jury answered: a letter chosen by position, not content, leaves the head
    nothing to read."""
    if jury.uncertainty_head is None:
        return {"note": "this model has no uncertainty head"}
    questions = held_out_mcqs()
    questions = questions[:n_mcq] if n_mcq else questions
    decoder = PoE(jury, tokenizer, max_new_tokens=8, seed=0)
    rows, abstained = [], 0
    for q in tqdm(questions, desc="held-out multiple choice", unit="q", disable=not progress):
        output = decoder.generate_with_cache(format_mcq(q), is_mcq=True, temperature=0)
        if output.uncertainty is None:
            abstained += 1
            continue
        letter = parse_choice(output.text.strip())
        source = "facts" if q.kind.startswith("fact:") else "generated"
        rows.append((source, output.uncertainty, int(letter == q.answer), letter or "none"))
    report = calibration_report([r[1] for r in rows], [r[2] for r in rows])
    report["abstained"] = abstained
    report["by_source"] = {}
    for source in sorted({r[0] for r in rows}):
        part = [r for r in rows if r[0] == source]
        summary = calibration_report([r[1] for r in part], [r[2] for r in part])
        report["by_source"][source] = {
            k: summary[k] for k in ("n", "accuracy", "mean_confidence", "ece", "brier", "auroc")
        }
    letters = [r[3] for r in rows]
    report["letters_answered"] = {x: letters.count(x) for x in sorted(set(letters))}
    return report


def _write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "signals.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "signals.md").write_text(markdown(results))
    plot(results, out / "signals.png")
    if "bins" in results["uncertainty_head"]:
        plot_reliability(
            {"uncertainty head": results["uncertainty_head"]},
            out / "uncertainty_reliability.png",
            title=f"Uncertainty head, {results['uncertainty_head']['n']} held-out MCQ answers",
        )


def markdown(results: dict[str, Any]) -> str:
    from olmo_tap.verify.experiment import machine_line

    dec = results["decoders"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        f"{results['questions']} held-out short-answer questions, greedy, up to 24 new tokens; jury = PoE over the "
        f"trained heads of {results['model']} with veto {results['veto']:g}; base = {results['base_model']} "
        "(one head, as released). AUROC of each signal for detecting a wrong answer (0.5 = chance), 95% bootstrap "
        "interval in brackets.",
        "",
        "| decoder | accuracy | best signal | AUROC |",
        "|---|---:|---|---:|",
    ]
    for name in DECODERS:
        d = dec[name]
        s = d["signals"][d["best_signal"]]
        lines.append(
            f"| {name} | {d['accuracy']:.1%} | {d['best_signal']} | {fmt(s['auroc'])} "
            f"[{fmt(s['ci95'][0])}, {fmt(s['ci95'][1])}] |"
        )
    m = results.get("margin")
    if m and m["value"] is not None:
        lines += [
            "",
            f"Margin of the jury's best signal ({m['jury_signal']}) over one head's own best ({m['single_signal']}): "
            f"{m['value']:+.3f}, paired bootstrap 95% interval [{fmt(m['ci95'][0])}, {fmt(m['ci95'][1])}].",
        ]
    lines += ["", "| signal | " + " | ".join(DECODERS) + " |", "|---|" + "---:|" * len(DECODERS)]
    for signal in SIGNALS:
        cells = []
        for name in DECODERS:
            s = dec[name]["signals"].get(signal)
            cells.append("-" if s is None or s["auroc"] is None else f"{s['auroc']:.3f} [{fmt(s['ci95'][0])}, "
                         f"{fmt(s['ci95'][1])}]")  # fmt: skip
        lines.append(f"| {signal} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy by kind of question:", "", "| kind | " + " | ".join(DECODERS) + " |"]
    lines.append("|---|" + "---:|" * len(DECODERS))
    for kind, row in results["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{row[n]:.1%}" for n in DECODERS) + " |")
    lines += ["", "Risk-coverage (accuracy of the most trusted fraction, by each decoder's best signal):", ""]
    lines.append("| decoder | " + " | ".join(f"{c}%" for c in range(10, 101, 10)) + " |")
    lines.append("|---|" + "---:|" * 10)
    for name in DECODERS:
        lines.append(f"| {name} | " + " | ".join(f"{p['accuracy']:.0%}" for p in dec[name]["risk_coverage"]) + " |")
    u = results["uncertainty_head"]
    if "ece" in u:
        lines += [
            "",
            f"Uncertainty head on {u['n']} held-out multiple-choice answers of the jury ({u['accuracy']:.0%} right, "
            f"{u['abstained']} abstentions): ECE {u['ece']:.3f}, Brier {u['brier']:.3f}, AUROC {fmt(u['auroc'])}, "
            f"mean p(correct) {u['mean_confidence']:.3f}.",
        ]
        for source, part in u.get("by_source", {}).items():
            lines.append(
                f"- {source}: {part['n']} answers, {part['accuracy']:.0%} right: ECE {part['ece']:.3f}, Brier "
                f"{part['brier']:.3f}, AUROC {fmt(part['auroc'])}, mean p(correct) {part['mean_confidence']:.3f}."
            )
        if u.get("letters_answered"):
            shares = ", ".join(f"{k} {v}" for k, v in u["letters_answered"].items())
            lines.append(f"- Letters the jury answered: {shares} (the right option's position is uniform).")
    lines += ["", f"Run time {results['minutes']:.0f} min on {machine_line(results['machine'])}."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """ROC curves of each decoder's best signal, and the risk-coverage curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc, rc) = plt.subplots(1, 2, figsize=(10, 4.2))
    roc.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for name in DECODERS:
        d = results["decoders"][name]
        signal = d["best_signal"]
        direction = SIGNALS[signal][1]
        rows = results["answers"][name]
        scores = np.array([direction * r["signals"][signal] for r in rows])
        wrong = np.array([not r["correct"] for r in rows])
        fpr, tpr = _roc(scores, wrong)
        value = d["signals"][signal]["auroc"]
        roc.plot(fpr, tpr, label=f"{name}: {signal} (AUROC {'undefined' if value is None else f'{value:.2f}'})")
        curve = d["risk_coverage"]
        rc.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=name)
    roc.set_xlabel("right answers flagged (false positive rate)")
    roc.set_ylabel("wrong answers flagged (true positive rate)")
    roc.set_title("Detecting wrong answers")
    roc.legend(fontsize=7, loc="lower right")
    rc.set_xlabel("coverage (fraction answered, most trusted first)")
    rc.set_ylabel("accuracy")
    rc.set_title("Risk-coverage")
    rc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _roc(scores: np.ndarray, positive: np.ndarray) -> tuple[list[float], list[float]]:
    thresholds = np.unique(scores)[::-1]
    n_pos, n_neg = max(int(positive.sum()), 1), max(int((~positive).sum()), 1)
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        flagged = scores >= t
        tpr.append(float((flagged & positive).sum() / n_pos))
        fpr.append(float((flagged & ~positive).sum() / n_neg))
    return fpr, tpr
