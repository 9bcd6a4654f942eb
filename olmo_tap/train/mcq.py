"""Multiple-choice questions with known answers, generated from a seed: no data set to download.

Kinds (each in difficulties 1, 2, 3):

- ``arithmetic``: sums and differences, then products (``What is 37 + 45?``);
- ``comparison``: the largest or smallest of four numbers, integers then close decimals;
- ``dates``: the weekday some days after a given weekday, then the calendar date some days after a date;
- ``units``: metric, time and volume conversions, integers then decimals.

Every question has four distinct options, exactly one of them right; the right option's position
is drawn uniformly. A record in JSONL is ``{"question", "choices", "answer" (a letter), "kind",
"difficulty"}``; ``format_mcq`` renders the prompt a head sees.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from olmo_tap.jsonl import iter_jsonl
from olmo_tap.train.data import ChatExample

LETTERS = "ABCD"
KINDS: tuple[str, ...] = ("arithmetic", "comparison", "dates", "units")
DIFFICULTIES: tuple[int, ...] = (1, 2, 3)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
INSTRUCTION = "Answer with the letter of the correct option."


@dataclass(frozen=True)
class MCQ:
    question: str
    choices: tuple[str, ...]
    answer: str  # letter of the correct choice
    kind: str = ""
    difficulty: int = 0

    @property
    def correct_choice(self) -> str:
        return self.choices[LETTERS.index(self.answer)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["choices"] = list(self.choices)
        return data

    @classmethod
    def from_dict(cls, record: Any, where: str = "record") -> MCQ:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise ValueError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} non-empty strings")
        if not isinstance(answer, str) or answer not in LETTERS[: len(choices)]:
            raise ValueError(f"{where}: 'answer' must be one of {list(LETTERS[: len(choices)])}, got {answer!r}")
        return cls(question, tuple(choices), answer, str(record.get("kind", "")), int(record.get("difficulty", 0)))


def read_mcqs(path: str | Path) -> list[MCQ]:
    """Validated questions of a JSONL file; an empty file is an error."""
    questions = [MCQ.from_dict(record, f"{path}:{number}") for number, record in iter_jsonl(path)]
    if not questions:
        raise ValueError(f"data file {path} has no questions (it is empty)")
    return questions


def format_mcq(q: MCQ) -> str:
    """The prompt text: question, lettered options, the instruction to answer with a letter."""
    options = "\n".join(f"{LETTERS[i]}) {choice}" for i, choice in enumerate(q.choices))
    return f"{q.question}\n{options}\n{INSTRUCTION}"


def mcq_example(q: MCQ) -> ChatExample:
    """Instruction data from a question: the prompt and the correct letter as the reply."""
    return ChatExample.from_prompt(format_mcq(q), q.answer, source=f"mcq:{q.kind}:{q.difficulty}")


# A letter alone or followed by ")", ".", ":" or ",": "A good answer" starts with an article, not an option.
_LEADING_LETTER = re.compile(r"^\W*([A-D])(?:\s*$|[).:,])")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-D])(?![A-Za-z])", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """The option letter an answer gives: a leading letter ("B", "B) 42", "(B)") or "the answer is B"."""
    match = _LEADING_LETTER.match(text) or _ANSWER_IS.search(text)
    return match.group(1).upper() if match else None


# ----- generators: each returns (question, correct answer, distractors) --------------------------------------


def _number(x: Decimal | int) -> str:
    """A number as people write it: no trailing zeros, no exponent."""
    if isinstance(x, int):
        return str(x)
    text = format(x.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _numeric_distractors(rng: random.Random, answer: Decimal | int, step: Decimal | int) -> list[str]:
    """Plausible wrong numbers near ``answer``: off by one or a few steps, by ten steps, digits slipped."""
    offsets = [1, -1, 2, -2, 3, -3, 10, -10, 5, -5, 11, -9]
    rng.shuffle(offsets)
    seen, out = {_number(answer)}, []
    for k in offsets:
        text = _number(answer + k * step)
        if text not in seen and not text.startswith("-") and text != "0":
            seen.add(text)
            out.append(text)
        if len(out) == 3:
            break
    return out


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, str, list[str]]:
    if difficulty == 1:
        a, b, op = rng.randint(2, 49), rng.randint(2, 49), rng.choice("+-")
    elif difficulty == 2:
        a, b, op = rng.randint(100, 999), rng.randint(10, 999), rng.choice("+-")
        if rng.random() < 0.4:
            a, b, op = rng.randint(12, 99), rng.randint(3, 9), "×"
    else:
        a, b, op = rng.randint(12, 99), rng.randint(12, 99), "×"
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", str(value), _numeric_distractors(rng, value, 1 if difficulty < 3 else 10)


def _comparison(rng: random.Random, difficulty: int) -> tuple[str, str, list[str]]:
    largest = rng.random() < 0.5
    if difficulty == 1:
        values = [Decimal(v) for v in rng.sample(range(1, 100), 4)]
    elif difficulty == 2:
        centre = rng.randint(150, 950)
        values = [Decimal(v) for v in rng.sample(range(centre - 40, centre + 40), 4)]
    else:
        centre = rng.randint(100, 900)
        values = [Decimal(v) / 100 for v in rng.sample(range(centre - 30, centre + 30), 4)]
    best = max(values) if largest else min(values)
    question = f"Which of these numbers is the {'largest' if largest else 'smallest'}?"
    return question, _number(best), [_number(v) for v in values if v != best]


def _dates(rng: random.Random, difficulty: int) -> tuple[str, str, list[str]]:
    if difficulty < 3:
        start = rng.randrange(7)
        days = rng.randint(1, 6) if difficulty == 1 else rng.randint(8, 60)
        answer = WEEKDAYS[(start + days) % 7]
        wrong = [d for d in WEEKDAYS if d != answer]
        rng.shuffle(wrong)
        question = f"Today is {WEEKDAYS[start]}. What day of the week will it be in {days} days?"
        return question, answer, wrong[:3]
    start_date = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(365 * 6))
    days = rng.randint(10, 90)
    answer_date = start_date + dt.timedelta(days=days)
    wrong_dates = {answer_date + dt.timedelta(days=k) for k in rng.sample([-2, -1, 1, 2, 7, -7, 30, -30], 3)}
    question = f"What is the date {days} days after {start_date.isoformat()}?"
    return question, answer_date.isoformat(), sorted(d.isoformat() for d in wrong_dates)


# (from unit, to unit, factor): how many ``to`` in one ``from``
UNITS: tuple[tuple[str, str, int], ...] = (
    ("metres", "centimetres", 100),
    ("kilometres", "metres", 1000),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)


def _units(rng: random.Random, difficulty: int) -> tuple[str, str, list[str]]:
    source, target, factor = rng.choice(UNITS)
    if difficulty == 1:
        value = Decimal(rng.randint(2, 9))
    elif difficulty == 2:
        value = Decimal(rng.randint(11, 99))
    else:
        value = Decimal(rng.randint(11, 999)) / 100  # two decimals, e.g. 3.75
    answer = value * factor
    step = Decimal(factor) / (100 if difficulty == 3 else 1)
    wrong = [_number(value * other) for other in (factor // 10, factor * 10) if other and other != factor]
    wrong = [w for w in wrong if w != _number(answer)]
    for text in _numeric_distractors(rng, answer, step):
        if len(wrong) >= 3:
            break
        if text not in wrong:
            wrong.append(text)
    return f"How many {target} are in {_number(value)} {source}?", _number(answer), wrong[:3]


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str, list[str]]]] = {
    "arithmetic": _arithmetic,
    "comparison": _comparison,
    "dates": _dates,
    "units": _units,
}


def generate_mcqs(
    n: int, seed: int = 0, kinds: Sequence[str] = KINDS, difficulties: Sequence[int] = DIFFICULTIES
) -> list[MCQ]:
    """``n`` questions cycling through kinds x difficulties, deterministic given ``seed``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of questions must be a positive integer, got {n!r}")
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown question kind(s) {unknown or '(none given)'}; known: {', '.join(KINDS)}")
    bad = [d for d in difficulties if d not in DIFFICULTIES]
    if bad or not difficulties:
        raise ValueError(f"difficulty must be among {list(DIFFICULTIES)}, got {list(difficulties)}")
    rng = random.Random(seed)
    combos = [(k, d) for k in kinds for d in difficulties]
    questions = []
    for i in range(n):
        kind, difficulty = combos[i % len(combos)]
        question, answer, wrong = GENERATORS[kind](rng, difficulty)
        if len(set(wrong)) != 3 or answer in wrong:  # a generator bug, never user input
            raise AssertionError(f"bad distractors for {question!r}: {answer!r} vs {wrong!r}")
        choices = [*wrong]
        position = rng.randrange(4)
        choices.insert(position, answer)
        questions.append(MCQ(question, tuple(choices), LETTERS[position], kind, difficulty))
    return questions
