"""The multiple-choice generator's answers (checked by recomputing them from the question text) and the
calibration metrics (against values computed by hand)."""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import Decimal

import pytest

from olmo_tap.jsonl import write_jsonl
from olmo_tap.train.calibration import (
    auroc,
    brier_score,
    calibration_report,
    expected_calibration_error,
    plot_reliability,
)
from olmo_tap.train.mcq import LETTERS, MCQ, format_mcq, generate_mcqs, parse_choice, read_mcqs

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# How many of the second unit make one of the first, written out independently of the generator.
PER_UNIT = {
    ("metres", "centimetres"): 100,
    ("kilometres", "metres"): 1000,
    ("kilograms", "grams"): 1000,
    ("litres", "millilitres"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
}


def solve(q: MCQ) -> str | Decimal:
    """The right answer, recomputed from the question's text (and, for comparisons, its choices)."""
    if m := re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", q.question):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return Decimal({"+": a + b, "-": a - b, "×": a * b}[op])
    if m := re.fullmatch(r"Which of these numbers is the (largest|smallest)\?", q.question):
        values = [Decimal(c) for c in q.choices]
        return max(values) if m.group(1) == "largest" else min(values)
    if m := re.fullmatch(r"Today is (\w+)\. What day of the week will it be in (\d+) days\?", q.question):
        return WEEKDAYS[(WEEKDAYS.index(m.group(1)) + int(m.group(2))) % 7]
    if m := re.fullmatch(r"What is the date (\d+) days after (\d{4}-\d\d-\d\d)\?", q.question):
        return (dt.date.fromisoformat(m.group(2)) + dt.timedelta(days=int(m.group(1)))).isoformat()
    if m := re.fullmatch(r"How many (\w+) are in ([\d.]+) (\w+)\?", q.question):
        return Decimal(m.group(2)) * PER_UNIT[(m.group(3), m.group(1))]
    raise AssertionError(f"unrecognised question {q.question!r}")


def matches(choice: str, answer: str | Decimal) -> bool:
    if isinstance(answer, Decimal):
        try:
            return Decimal(choice) == answer
        except ArithmeticError:
            return False
    return choice == answer


def test_every_generated_answer_is_right_and_unique():
    questions = generate_mcqs(1200, seed=7)
    kinds = {(q.kind, q.difficulty) for q in questions}
    assert len(kinds) == 12  # 4 kinds x 3 difficulties
    positions = [q.answer for q in questions]
    for q in questions:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4, q
        answer = solve(q)
        right = [LETTERS[i] for i, c in enumerate(q.choices) if matches(c, answer)]
        assert right == [q.answer], (q, answer)
    # The right option's position is spread over A-D (each expected 300 times; 200 is > 10 sigma away).
    assert all(positions.count(letter) > 200 for letter in LETTERS)


def test_generation_is_deterministic_and_validated(tmp_path):
    assert generate_mcqs(30, seed=3) == generate_mcqs(30, seed=3)
    assert generate_mcqs(30, seed=3) != generate_mcqs(30, seed=4)
    with pytest.raises(ValueError, match="unknown question kind"):
        generate_mcqs(5, kinds=["chess"])
    with pytest.raises(ValueError, match="difficulty"):
        generate_mcqs(5, difficulties=[4])
    path = tmp_path / "q.jsonl"
    write_jsonl(path, [q.to_dict() for q in generate_mcqs(5, seed=1)])
    assert read_mcqs(path) == generate_mcqs(5, seed=1)
    write_jsonl(path, [{"question": "2+2?", "choices": ["4", "5"], "answer": "C"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: 'answer' must be one of \['A', 'B'\]"):
        read_mcqs(path)


def test_prompt_format_and_answer_parsing():
    q = MCQ("What is 1 + 1?", ("3", "2", "4", "5"), "B")
    assert format_mcq(q) == "What is 1 + 1?\nA) 3\nB) 2\nC) 4\nD) 5\nAnswer with the letter of the correct option."
    assert q.correct_choice == "2"
    for text, letter in [("B", "B"), (" B) 2", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("D: 5", "D")]:
        assert parse_choice(text) == letter, text
    for text in ["A good question", "Both", "", "I think so"]:
        assert parse_choice(text) is None, text


def test_calibration_metrics_equal_hand_computed_values(tmp_path):
    probs = [0.9, 0.8, 0.3, 0.6, 0.1, 0.75]
    labels = [1, 0, 0, 1, 0, 1]
    # Brier: (0.01 + 0.64 + 0.09 + 0.16 + 0.01 + 0.0625) / 6
    assert brier_score(probs, labels) == pytest.approx(0.9725 / 6)
    # AUROC: positives {0.9, 0.6, 0.75} vs negatives {0.8, 0.3, 0.1}: 0.9 beats 3, 0.6 beats 2, 0.75 beats 2 -> 7/9
    assert auroc(probs, labels) == pytest.approx(7 / 9)
    assert auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts one half
    assert auroc([0.2, 0.4], [1, 1]) is None
    # ECE with 5 bins: [0.1] -> bin 0, [0.3] -> bin 1, [0.6] -> bin 3, [0.8, 0.75] -> bin 3? no: 0.75*5 = 3.75 -> bin 3;
    # 0.8*5 = 4 -> bin 4; 0.9 -> bin 4. Bins: 0 {0.1:0}, 1 {0.3:0}, 3 {0.6:1, 0.75:1}, 4 {0.8:0, 0.9:1}.
    expected = (1 / 6) * 0.1 + (1 / 6) * 0.3 + (2 / 6) * abs(1 - 0.675) + (2 / 6) * abs(0.5 - 0.85)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # p = 1 falls in the last bin
    report = calibration_report(probs, labels, n_bins=5)
    assert [b["count"] for b in report["bins"]] == [1, 1, 0, 2, 2]
    assert report["bins"][2]["accuracy"] is None and math.isclose(report["accuracy"], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.2], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        brier_score([0.2], [2])
    png = plot_reliability({"before": report, "after": report}, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
