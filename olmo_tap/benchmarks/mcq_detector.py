"""How well does ``olmo_tap.certainty.routing.detect_mcq`` tell multiple choice from free text?
``python -m olmo_tap.benchmarks.mcq_detector [--out results/certainty] [--regenerate]``

The labelled set (``olmo_tap/certainty/mcq_detection_set.jsonl``, records ``{"text", "mcq", "layout"}``) is built
deterministically (seed ``SEED``) from the project's own questions, all offline:

- positives: ``generate_mcqs`` questions and ``fact_mcqs`` of ``all_facts`` rendered in ``LAYOUTS`` (the standard
  ``format_mcq`` prompt, without its instruction line, "A.", "(A)", "A:", "[A]", lowercase "a)", inline on one
  line, inline "(A)", options before the question);
- negatives: every prompt of ``olmo_tap/train/prompts.txt``, fact questions alone and as the fact prompts, and
  generated multiple-choice questions stripped of their options (the same words, no options);
- hand-written hard cases in two batches, written before the rule: ``hand-dev`` (looked at while writing the rule)
  and ``hand-holdout`` (not looked at until the rule was frozen, so its numbers are not tuned). Some positives use
  layouts the rule deliberately does not accept (numbered options, "A - x", inline "A. x"); they stay labelled as
  what a reader sees, multiple choice, and count as misses.

``--regenerate`` rewrites the shipped set; without it the shipped set is read and must equal a fresh build.
Precision, recall, recall per layout (accuracy per layout for negatives) and every misclassified text go to
``<out>/mcq_detector.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SEED = 29  # used nowhere else in the project: the set does not reuse the training draws
SET_PATH = Path(__file__).resolve().parent.parent / "certainty" / "mcq_detection_set.jsonl"
PROMPTS_PATH = Path(__file__).resolve().parent.parent / "train" / "prompts.txt"
PER_LAYOUT_GENERATED = 10  # generate_mcqs questions per layout
PER_LAYOUT_FACTS = 5  # fact_mcqs questions per layout
N_FACT_QUESTIONS = 60  # fact questions as free-text negatives
N_FACT_PROMPTS = 30  # fact prompts ("... Answer in a few words.") as negatives
N_STRIPPED = 20  # generated MCQ questions without their options, as negatives

# ----- hand-written hard cases (written before the rule) ---------------------------------------------------------
# (text, is multiple choice, what makes it hard)

HAND_DEV: tuple[tuple[str, bool, str], ...] = (
    ("Which vitamin is made in the skin in sunlight?\nA) Vitamin A\nB) Vitamin C\nC) Vitamin D\nD) Vitamin K",
     True, "letters-in-options"),
    ("Which is a mammal? A) shark B) whale C) trout D) squid", True, "inline"),
    ("(A) 12 (B) 14 (C) 16\nWhich of these is 7 × 2?", True, "options-first-inline"),
    ("Pick one:\n[A] red\n[B] blue\n[C] green", True, "bracket"),
    ("Q: What is the capital of Peru?\na. Lima\nb. Quito\nc. Bogota", True, "lowercase-dot"),
    ("Is the Sun a star?\nA) Yes\nB) No", True, "two-options"),
    ("Choose the correct spelling: A) necessary; B) neccessary; C) necesary", True, "inline-semicolons"),
    ("Which number is prime?\n\nA) 21\n\nB) 23\n\nC) 25\n\nD) 27\n\nReply with a letter only.", True, "blank-lines"),
    ("Question: Which gas do plants absorb?\nChoices:\n(A) oxygen\n(B) carbon dioxide\n(C) nitrogen\n(D) helium\n"
     "Answer:", True, "mmlu-style"),
    ("Select the odd one out.\n    A) apple\n    B) banana\n    C) carrot\n    D) cherry", True, "indented"),
    ("which is heavier? a) a kilo of feathers b) a kilo of iron c) they weigh the same", True, "inline-lowercase"),
    ("Options:\nA: Paris\nB: Lyon\nC: Marseille\nWhich is the capital of France?", True, "colon-options-first"),
    ("A patient presents with fatigue and pallor. Which test comes first?\nA. Complete blood count\nB. Chest X-ray\n"
     "C. MRI of the brain\nD. Lumbar puncture", True, "dot-long-options"),
    ("What is f'(x) if f(x) = x^2?\nA) f'(x) = x\nB) f'(x) = 2x\nC) f'(x) = x^2\nD) f'(x) = 2", True,
     "parentheses-in-options"),
    ("True or false: whales are fish. A) True B) False", True, "true-false-inline"),
    ("Which continent is Egypt in?\n**A)** Asia\n**B)** Africa\n**C)** Europe", True, "markdown-bold"),
    ("1. Which is a prime?\nA) 4\nB) 7\n2. Which is even?\nA) 3\nB) 8", True, "two-questions"),
    ("Which is larger?\nA)0.5\nB)0.45", True, "no-space"),
    ("Which of these is a prime number?\n1) 4\n2) 7\n3) 9\n4) 15", True, "numbered-options"),
    ("What is the boiling point of water at sea level?  A) 90 °C  B) 100 °C  C) 110 °C  D) 120 °C", True,
     "inline-wide"),
    ("What is vitamin A?", False, "letter-word"),
    ("Is plan A or plan B better?", False, "letter-words"),
    ("Grade A. Then B. Then C. That was my school year, in short.", False, "letter-dots-inline"),
    ("Explain the A* algorithm.", False, "letter-word"),
    ("Rank A) by speed and tell me why.", False, "single-marker"),
    ("Steps:\n1. Preheat the oven.\n2. Mix the flour and water.\n3. Bake for 20 minutes.\nIs this right?", False,
     "numbered-steps"),
    ("Shopping list:\n- apples\n- bananas\n- cherries\nWhat can I cook with these?", False, "bullets"),
    ("```python\nA = 1\nB = 2\nprint(A + B)\n```\nWhat does this print?", False, "code"),
    ("A: Hi, how are you?\nB: Fine, thanks. And you?\nTranslate this dialogue into French.", False, "dialogue"),
    ("Person A said yes. Person B said no. Who is right?", False, "letter-words"),
    ("What is the difference between type A and type B personalities?", False, "letter-words"),
    ("In section A) of the form write your name, and in section C) your address.", False, "non-consecutive"),
    ("Compare options A and B in a table.", False, "letter-words"),
    ("Blood types A, B, AB and O: which one is the universal donor?", False, "letter-list"),
    ("My name is A. B. Smith. Write me a short bio.", False, "initials"),
    ("Figure 3(a) shows the input and Figure 3(b) the output. Explain the difference.", False, "figure-panels"),
    ("Write a report with these sections:\nA. Introduction\nB. Methods\nC. Results", False, "outline"),
    ("He scored A+ in maths and B+ in physics. Is that good?", False, "grades"),
    ("Set A = {1, 2} and set B = {2, 3}. What is the intersection of A and B?", False, "math-sets"),
    ("I think a) is wrong because b) says the opposite. Can you explain?", False, "option-references"),
    ("| A | B |\n|---|---|\n| 1 | 2 |\nSum each column.", False, "table"),
    ("switch (x) {\n  case A: return 1;\n  case B: return 2;\n}\nWhat does this return for B?", False, "code"),
    ("Which is better, A or B?", False, "letter-words"),
)  # fmt: skip

HAND_HOLDOUT: tuple[tuple[str, bool, str], ...] = (
    ("Which organ pumps blood?\n(a) liver\n(b) heart\n(c) lung", True, "lowercase-parens"),
    ("Identify the noble gas: [A] oxygen [B] argon [C] nitrogen [D] hydrogen", True, "bracket-inline"),
    ("What colour do you get by mixing blue and yellow?\nA - green\nB - purple\nC - orange", True, "dash"),
    ("A) 1776\nB) 1789\nC) 1812\nIn which year did the French Revolution begin? Answer with A, B or C.", True,
     "options-first"),
    ("Which word is a verb? A. run B. blue C. table D. happy", True, "dot-inline"),
    ("Who wrote Hamlet?\nA) Charles Dickens\nB) William Shakespeare\nC) Jane Austen\nD) Mark Twain\nE) Leo Tolstoy",
     True, "five-options"),
    ("Solve 2x + 3 = 7.\n(A) x = 1\n(B) x = 2\n(C) x = 3\n(D) x = 4", True, "parens-equations"),
    ("The speed of light is about ___ km/s.\nA: 300,000\nB: 30,000\nC: 3,000", True, "colon-cloze"),
    ("Which of the following is NOT a primary colour?\nA) Red\nB) Blue\nC) Green\nD) Yellow\nExplain your answer.",
     True, "trailing-instruction"),
    ("Choose: a) cat, b) dog, c) fish — which one can breathe underwater?", True, "inline-commas"),
    ("Which ocean is the largest?\n\tA)\tAtlantic\n\tB)\tPacific\n\tC)\tIndian", True, "tabs"),
    ("Which is a renewable energy source?\n A. Coal\n B. Oil\n C. Wind\n D. Natural gas", True, "dot-indented"),
    ("What does DNA stand for? (A) Deoxyribonucleic acid (B) Dinitrogen acid (C) Double nucleic acid", True,
     "parens-inline"),
    ("Select all that apply:\nA) 2 is even\nB) 3 is even\nC) 4 is even", True, "multi-select"),
    ("Which city hosted the 2012 Olympics?\nA) Beijing B) London\nC) Rio D) Tokyo", True, "grid"),
    ("Which is correct? A) their B) there C) they're — 'I left my keys over ___.'", True, "inline-cloze"),
    ("Pick the synonym of 'big':\n[a] tiny\n[b] large\n[c] thin", True, "bracket-lowercase"),
    ("Which element has the symbol Fe?\nA.) Iron\nB.) Fluorine\nC.) Lead", True, "dot-paren"),
    ("What's 15% of 200? Options: A) 15 B) 20 C) 30 D) 45", True, "inline-options-word"),
    ("Q3) Which layer of the Earth is liquid?\nA) crust\nB) outer core\nC) inner core", True, "question-number"),
    ("Pick the odd one out: 1. cat 2. dog 3. car 4. cow", True, "numbered-options"),
    ("What is hepatitis A and how is it different from hepatitis B?", False, "letter-words"),
    ("Write a haiku about plan B.", False, "letter-word"),
    ("Explain Big-O: is O(n) better than O(n log n)?", False, "parenthesised-letter"),
    ("Answer both parts:\n(a) Define osmosis.\n(b) Give an example from plants.", False, "sub-questions"),
    ("A. A. Milne wrote Winnie-the-Pooh. What else did he write?", False, "initials"),
    ("Plan A: stay home. Plan B: go out. What do you think I should do?", False, "letter-colons"),
    ("Section 2(a) and 2(b) of the contract say different things. Which applies?", False, "legal-clauses"),
    ("The Beatles released the A-side and the B-side together. Why?", False, "letter-words"),
    ("Use vitamins A, B and C in a sentence.", False, "letter-list"),
    ("Point A is 5 km from point B. How long does it take to walk?", False, "letter-words"),
    ("1) Wash the rice.\n2) Boil the water.\n3) Add the rice.\nHow long should it cook?", False, "numbered-steps"),
    ("* Item one\n* Item two\n* Item three", False, "bullets"),
    ("def f(a, b):\n    return (a) + (b)\n", False, "code"),
    ("Rate the film from A to F, where A is best.", False, "letter-range"),
    ("Email a.jones@example.com and b.smith@example.com about the meeting.", False, "emails"),
    ("What does the A) in the margin of my notes mean?", False, "single-marker"),
    ("In chess, what does 1. e4 e5 2. Nf3 mean?", False, "chess-notation"),
    ("Prove that if (a) holds then (b) follows, where (a) is x > 0 and (b) is x² > 0.", False, "math-conditions"),
    ("Which is better for a beginner: Python or JavaScript?", False, "choice-without-options"),
    ("Mark each answer A, B, C or D on the sheet. How do I fill it in?", False, "letter-list"),
    ("Interviewer: Hello.\nCandidate: Hi.\nContinue the interview.", False, "dialogue"),
    ("Tell me about the A380 and the B747.", False, "model-names"),
    ("## A. Background\nSome text.\n## B. Aim\nMore text.\nSummarise this document.", False, "headings"),
)  # fmt: skip


# ----- rendering the project's questions ---------------------------------------------------------------------------


def _lines(choices: Sequence[str], marker: Callable[[str], str]) -> str:
    return "\n".join(f"{marker(chr(65 + i))} {c}" for i, c in enumerate(choices))


def _inline(choices: Sequence[str], marker: Callable[[str], str]) -> str:
    return " ".join(f"{marker(chr(65 + i))} {c}" for i, c in enumerate(choices))


def _render(layout: str, question: str, choices: Sequence[str], instruction: str) -> str:
    """One question in one layout (the standard ``format_mcq`` text is the layout "newline-paren")."""
    paren = lambda x: f"{x})"  # noqa: E731 - a table of one-line markers reads best as lambdas
    if layout == "newline-paren":
        return f"{question}\n{_lines(choices, paren)}\n{instruction}"
    if layout == "newline-paren-no-instruction":
        return f"{question}\n{_lines(choices, paren)}"
    if layout == "newline-dot":
        return f"{question}\n{_lines(choices, lambda x: f'{x}.')}\n{instruction}"
    if layout == "newline-parens":
        return f"{question}\n{_lines(choices, lambda x: f'({x})')}\n{instruction}"
    if layout == "newline-colon":
        return f"{question}\n{_lines(choices, lambda x: f'{x}:')}"
    if layout == "newline-bracket":
        return f"{question}\n{_lines(choices, lambda x: f'[{x}]')}\n{instruction}"
    if layout == "lowercase":
        return f"{question}\n{_lines(choices, lambda x: f'{x.lower()})')}\n{instruction}"
    if layout == "inline":
        return f"{question} {_inline(choices, paren)}"
    if layout == "inline-parens":
        return f"{question} {_inline(choices, lambda x: f'({x})')} {instruction}"
    if layout == "options-first":
        return f"{_lines(choices, paren)}\n{question}\n{instruction}"
    raise ValueError(f"unknown layout {layout!r}")


LAYOUTS: tuple[str, ...] = (
    "newline-paren", "newline-paren-no-instruction", "newline-dot", "newline-parens", "newline-colon",
    "newline-bracket", "lowercase", "inline", "inline-parens", "options-first",
)  # fmt: skip


def _prompts() -> list[str]:
    lines = PROMPTS_PATH.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def build_set(seed: int = SEED) -> list[dict[str, Any]]:
    """The labelled set, deterministic given ``seed`` and the project's question sources."""
    from olmo_tap.train.facts import all_facts, fact_mcqs
    from olmo_tap.train.mcq import INSTRUCTION, format_mcq, generate_mcqs

    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    n = len(LAYOUTS) * PER_LAYOUT_GENERATED
    generated = generate_mcqs(n + N_STRIPPED, seed=seed)
    facts = all_facts(seed)
    table_facts = [f for f in facts if f.match != "number"]
    from_facts = fact_mcqs(rng.sample(table_facts, len(LAYOUTS) * PER_LAYOUT_FACTS), seed=seed)
    for i, layout in enumerate(LAYOUTS):
        chunk = generated[i * PER_LAYOUT_GENERATED : (i + 1) * PER_LAYOUT_GENERATED]
        chunk += from_facts[i * PER_LAYOUT_FACTS : (i + 1) * PER_LAYOUT_FACTS]
        for q in chunk:
            text = _render(layout, q.question, q.choices, INSTRUCTION)
            if layout == "newline-paren":
                assert text == format_mcq(q)  # the standard layout is exactly what the heads are trained on
            records.append({"text": text, "mcq": True, "layout": layout})
    records += [{"text": q.question, "mcq": False, "layout": "mcq-question-without-options"} for q in generated[n:]]
    records += [{"text": p, "mcq": False, "layout": "prompts.txt"} for p in _prompts()]
    sampled = rng.sample(facts, N_FACT_QUESTIONS + N_FACT_PROMPTS)
    records += [{"text": f.question, "mcq": False, "layout": "fact-question"} for f in sampled[:N_FACT_QUESTIONS]]
    records += [{"text": f.prompt, "mcq": False, "layout": "fact-prompt"} for f in sampled[N_FACT_QUESTIONS:]]
    for batch, cases in (("hand-dev", HAND_DEV), ("hand-holdout", HAND_HOLDOUT)):
        records += [{"text": t, "mcq": label, "layout": f"{batch}/{kind}"} for t, label, kind in cases]
    return records


def read_set(path: str | Path = SET_PATH) -> list[dict[str, Any]]:
    from olmo_tap.jsonl import iter_jsonl

    return [record for _, record in iter_jsonl(path)]


# ----- measuring ---------------------------------------------------------------------------------------------------


def evaluate(records: Sequence[dict[str, Any]], detector: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Precision and recall of ``detector`` (default ``detect_mcq``) on ``records``; per layout, the share of its
    records classified right (recall for positive layouts, specificity for negative ones); every mistake."""
    if detector is None:
        from olmo_tap.certainty.routing import detect_mcq as detector
    tp = fp = fn = tn = 0
    per_layout: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [right, total]
    per_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    mistakes = []
    for record in records:
        predicted, truth = bool(detector(record["text"])), bool(record["mcq"])
        tp += predicted and truth
        fp += predicted and not truth
        fn += truth and not predicted
        tn += not predicted and not truth
        right = predicted == truth
        layout = record["layout"]
        source = layout.split("/")[0] if "/" in layout else "generated"
        group = f"{source} {'positives' if truth else 'negatives'}"
        for table, key in ((per_layout, (layout, truth)), (per_group, group)):
            table[key][0] += right
            table[key][1] += 1
        if not right:
            kind = "false positive" if predicted else "false negative"
            mistakes.append({"kind": kind, "layout": layout, "text": record["text"]})
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {
        "n": len(records),
        "positives": tp + fn,
        "negatives": fp + tn,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "per_layout": [
            {"layout": layout, "mcq": truth, "right": r, "total": t, "share_right": round(r / t, 4)}
            for (layout, truth), (r, t) in sorted(per_layout.items(), key=lambda kv: (not kv[0][1], kv[0][0]))
        ],
        "per_group": {g: {"right": r, "total": t, "share_right": round(r / t, 4)} for g, (r, t) in per_group.items()},
        "mistakes": mistakes,
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["confusion"]
    lines = [
        "# Multiple-choice detection (`olmo_tap.certainty.routing.detect_mcq`)",
        "",
        f"Set: `olmo_tap/certainty/mcq_detection_set.jsonl`, {result['n']} texts ({result['positives']} multiple "
        f"choice, {result['negatives']} free text), built by `python -m olmo_tap.benchmarks.mcq_detector "
        f"--regenerate` (seed {SEED}). The rule is stated in the docstring of `olmo_tap/certainty/routing.py`.",
        "",
        f"- precision **{result['precision']:.4f}**, recall **{result['recall']:.4f}** "
        f"(tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})",
    ]
    for name, sub in result.get("subsets", {}).items():
        lines.append(f"- {name} only ({sub['n']} texts): precision {sub['precision']:.4f}, recall {sub['recall']:.4f}")
    lines += [
        "",
        "The generated texts are easy by construction (the project's own layouts); the hand-written hard cases, the "
        "held-out batch above all, are the honest measure.",
        "",
        "## By source",
        "",
        "`hand-dev` cases were in view while the rule was written; `hand-holdout` cases were written at the same time "
        "but only run once the rule was frozen.",
        "",
        "| source | right | total | share |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {g} | {v['right']} | {v['total']} | {v['share_right']:.3f} |" for g, v in result["per_group"].items()]
    lines += ["", "## By layout (recall for multiple choice, specificity for free text)", ""]
    lines += ["| layout | multiple choice | right | total | share |", "|---|---|---:|---:|---:|"]
    lines += [
        f"| {r['layout']} | {'yes' if r['mcq'] else 'no'} | {r['right']} | {r['total']} | {r['share_right']:.3f} |"
        for r in result["per_layout"]
    ]
    lines += ["", f"## Misclassified ({len(result['mistakes'])})", ""]
    for m in result["mistakes"]:
        lines.append(f"- {m['kind']} ({m['layout']}): `{json.dumps(m['text'], ensure_ascii=False)}`")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/certainty", help="folder for mcq_detector.json and .md")
    parser.add_argument("--regenerate", action="store_true", help=f"rewrite {SET_PATH.name} from the sources")
    args = parser.parse_args(argv)
    from olmo_tap.jsonl import write_jsonl

    records = build_set()
    if args.regenerate:
        write_jsonl(SET_PATH, records)
        print(f"wrote {SET_PATH} ({len(records)} records)")
    elif read_set() != records:
        print(f"{SET_PATH} differs from a fresh build: run with --regenerate (and review the diff)")
        return 1
    result = evaluate(records)
    # the generated records are easy by construction: the hand-written ones, the held-out batch above all, are the
    # honest measure of the rule on text it was not shaped by
    for name, prefix in (("hand-written", "hand-"), ("hand-holdout", "hand-holdout/")):
        subset = evaluate([r for r in records if r["layout"].startswith(prefix)])
        result.setdefault("subsets", {})[name] = {k: subset[k] for k in ("n", "precision", "recall", "confusion")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mcq_detector.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "mcq_detector.md").write_text(markdown(result), encoding="utf-8")
    print(f"precision {result['precision']:.4f}, recall {result['recall']:.4f}, {len(result['mistakes'])} mistakes")
    print(f"wrote {out / 'mcq_detector.md'} and {out / 'mcq_detector.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
