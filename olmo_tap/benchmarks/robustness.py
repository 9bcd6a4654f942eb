"""``olmo-tap experiment robustness``: what the attack bank does to held-out questions, and whom it transfers to.

Held-out questions: the multiple-choice questions of ``olmo-tap experiment signals`` (``held_out_mcqs``), minus
any a bank was optimised on, in a seeded order; the first ``n_questions``. Every decoder answers greedily
(``olmo_tap.robustness.measure``: the jury = PoE over the text heads, with and without the veto; naive averaging;
one head) each question as it is and with each suffix appended; a pair (question, suffix) is *flipped* when the
option letter changes. Attack success = flipped pairs / pairs.

Three suffix sets:

- ``bank``: the bank under test (by default the one shipped for the model: GCG against the jury);
- ``random``: as many random suffixes of the same length, drawn from the tokens GCG may use (seeded): how much
  any noise flips, the floor GCG must beat;
- ``head0``: a small bank optimised against head 0 alone (built here, or reused), measured on every head, naive
  and the jury: transfer from one head to the others and to the jury.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from olmo_tap.benchmarks.harness import machine_info
from olmo_tap.benchmarks.signals import held_out_mcqs
from olmo_tap.hydra import HydraTransformer
from olmo_tap.robustness.bank import AttackBank, load_bank, shipped_bank_path
from olmo_tap.robustness.build import build_bank
from olmo_tap.robustness.gcg import Attack, attacked_text, question_digest
from olmo_tap.robustness.measure import answer_letters, target_settings
from olmo_tap.robustness.settings import GCGSettings
from olmo_tap.train.mcq import MCQ, format_mcq
from olmo_tap.weights.presets import DEFAULT_MODEL
from olmo_tap.weights.tokenizer import load_tokenizer

ORDER_SEED = 7
RANDOM_SEED = 11
HEAD0_ENTRIES = 1  # each takes ~7-30 min on 2 busy cores (24 steps: a head flips harder than the jury)
MAIN_DECODERS = ("jury", "jury+veto", "naive", "head:0")


def held_out(banks: list[AttackBank], n: int) -> list[MCQ]:
    """Held-out questions no bank was optimised on, in a seeded order."""
    seen = {d for bank in banks for e in bank.entries for d in e.questions}
    questions = [q for q in held_out_mcqs() if question_digest(q) not in seen]
    random.Random(ORDER_SEED).shuffle(questions)
    return questions[:n]


def random_suffixes(attack: Attack, n: int, length: int, seed: int = RANDOM_SEED) -> list[str]:
    """``n`` suffixes of ``length`` random allowed tokens that re-tokenise as drawn."""
    anywhere, first = (m.nonzero()[:, 0].tolist() for m in attack.allowed)
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        text = attack.suffix_text([rng.choice(first)] + [rng.choice(anywhere) for _ in range(length - 1)])
        if text is not None:
            out.append(text)
    return out


def success(clean: list[str | None], attacked: list[list[str | None]]) -> dict[str, Any]:
    """Flip rates of suffix sets: per suffix, overall, and the share of questions some suffix flips."""
    per_suffix = [sum(a != c for a, c in zip(row, clean, strict=True)) / len(clean) for row in attacked]
    any_flip = sum(any(row[i] != clean[i] for row in attacked) for i in range(len(clean))) / len(clean)
    return {
        "rate": sum(per_suffix) / len(per_suffix),
        "per_suffix": [round(r, 4) for r in per_suffix],
        "best_suffix": max(per_suffix),
        "any_suffix": any_flip,
    }


def run_robustness(
    out: str | Path = "results/robustness",
    *,
    model: str = DEFAULT_MODEL,
    bank_path: str | Path | None = None,
    n_questions: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    jury = HydraTransformer.from_pretrained(model, dtype="float32", device="cpu", progress=progress)
    path = Path(bank_path) if bank_path is not None else shipped_bank_path(model)
    if path is None:
        raise FileNotFoundError(f"no attack bank ships for {model!r}: give --bank (build one with train attacks)")
    bank = load_bank(path)
    head0_settings = GCGSettings(**{**bank.settings, "target": "head:0"})
    t0 = time.perf_counter()
    head0 = build_bank(
        jury, tokenizer, out / "bank_head0.json", model_name=model, n_entries=HEAD0_ENTRIES,
        settings=head0_settings, progress=progress,
    )  # fmt: skip
    head0_seconds = sum(e.seconds for e in head0.entries) or time.perf_counter() - t0
    questions = held_out([bank, head0], n_questions)
    texts = [format_mcq(q) for q in questions]
    attack = Attack(jury, tokenizer, GCGSettings(**bank.settings))
    suffix_sets = {
        "bank": bank.suffixes,
        "random": random_suffixes(attack, len(bank.entries), int(bank.settings["suffix_tokens"])),
        "head0": head0.suffixes,
    }
    plan = {d: ("bank", "random", "head0") for d in MAIN_DECODERS}
    plan.update({f"head:{h}": ("head0", "bank") for h in range(1, jury.n_text_heads)})
    total = sum(1 + sum(len(suffix_sets[s]) for s in sets) for sets in plan.values())
    results: dict[str, Any] = {}
    with tqdm(total=total * len(texts), desc="answers", unit="answer", disable=not progress) as bar:
        for decoder, sets in plan.items():
            settings = target_settings(decoder)
            clean = answer_letters(jury, tokenizer, settings, texts)
            bar.update(len(texts))
            right = sum(c == q.answer for c, q in zip(clean, questions, strict=True)) / len(questions)
            row: dict[str, Any] = {"clean_accuracy": right}
            for name in sets:
                attacked = []
                for suffix in suffix_sets[name]:
                    prompts = [attacked_text(t, suffix) for t in texts]
                    attacked.append(answer_letters(jury, tokenizer, settings, prompts))
                    bar.update(len(texts))
                row[name] = success(clean, attacked)
            results[decoder] = row
    report = {
        "model": model,
        "bank": {"path": str(path), "fingerprint": bank.fingerprint, "settings": bank.settings,
                 "entries": len(bank.entries), "build_seconds": sum(e.seconds for e in bank.entries),
                 "success_at_creation": [e.success for e in bank.entries]},
        "head0_bank": {"entries": len(head0.entries), "build_seconds": round(head0_seconds, 1),
                       "success_at_creation": [e.success for e in head0.entries]},
        "suffixes": suffix_sets,
        "n_questions": len(questions),
        "decoders": results,
        "machine": machine_info(torch.device("cpu")),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    (out / "attacks.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "attacks.md").write_text(markdown(report))
    return report


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    d = report["decoders"]
    m = report["machine"]
    lines = [
        "# The attack bank on held-out questions",
        "",
        f"Model `{report['model']}`; {report['n_questions']} held-out multiple-choice questions no bank was "
        f"optimised on; greedy decoders. Bank: {report['bank']['entries']} GCG suffixes against the jury "
        f"(built in {report['bank']['build_seconds']:.0f} s); random: as many random suffixes of the same length; "
        f"head0: {report['head0_bank']['entries']} GCG suffixes against head 0 alone "
        f"(built in {report['head0_bank']['build_seconds']:.0f} s). Attack success = flipped (question, suffix) "
        "pairs / pairs; 'any' = questions at least one suffix of the set flips.",
        "",
        "| decoder | clean accuracy | bank (jury GCG) | any | random suffixes | any | head-0 GCG | any |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MAIN_DECODERS:
        r = d[name]
        rates = [percent(r[s][k]) for s in ("bank", "random", "head0") for k in ("rate", "any_suffix")]
        lines.append(f"| {name} | {percent(r['clean_accuracy'])} | " + " | ".join(rates) + " |")
    heads = [name for name in d if name.startswith("head:")]
    lines += [
        "",
        "## Transfer between heads",
        "",
        "| suffixes built against | " + " | ".join(sorted(heads)) + " | naive | jury |",
        "|---|" + "---:|" * (len(heads) + 2),
    ]
    for name, label in (("head0", "head 0"), ("bank", "the jury")):
        cells = [percent(d[h][name]["rate"]) for h in sorted(heads)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {percent(d['naive'][name]['rate'])} | "
                     f"{percent(d['jury'][name]['rate'])} |")  # fmt: skip
    lines += [
        "",
        f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), torch {torch.__version__}, {m['torch_threads']} threads; "
        f"{report['elapsed_s']:.0f} s in all.",
        "",
    ]
    return "\n".join(lines)
