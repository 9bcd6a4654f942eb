"""Short-answer questions with known answers, all offline: the facts the default jury trains on and the held-out
set that measures what its trust signals are worth (``olmo-tap experiment signals``).

Kinds: capitals of countries, chemical symbols, opposites (from tables in this module), two-number arithmetic,
unit conversions and the next/previous weekday or month (generated). Each question lands in the training or the
held-out split by a stable hash of its text, so the two never share a question, whatever else changes.

How an answer is marked (``is_correct``), the rule stated once:

- words (capitals, opposites, weekdays, months): after lower-casing, folding accents and turning punctuation into
  spaces, one of the accepted answers occurs as whole words in the answer's first 30 words;
- chemical symbols: the symbol occurs as a whole word with its own capitalisation ("Au", not "au");
- numbers: the number the answer gives equals the expected one: the first number after its last "=", else its
  first number that does not restate one of the question's (each skipped once), else its first number
  ("7 + 5 = 12", "12" and "There are 180 minutes in 3 hours" are right; "13, or maybe 12" and "44 - 22 = 44"
  are wrong).
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from olmo_tap.train.data import ChatExample
from olmo_tap.train.mcq import LETTERS, MCQ, UNITS, WEEKDAYS

SUFFIX = "Answer in a few words."  # appended to every question: the answers stay short enough to mark
HELD_OUT_PERCENT = 50  # of each kind's questions, by hash of the question text

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("United Kingdom", "London"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Czech Republic", "Prague"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Russia", "Moscow"),
    ("Ukraine", "Kyiv|Kiev"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Estonia", "Tallinn"),
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Nigeria", "Abuja"), ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Senegal", "Dakar"), ("South Africa", "Pretoria"),
    ("Uganda", "Kampala"), ("Tanzania", "Dodoma"), ("Zimbabwe", "Harare"), ("Angola", "Luanda"),
    ("Sudan", "Khartoum"), ("Libya", "Tripoli"), ("Japan", "Tokyo"), ("China", "Beijing|Peking"),
    ("South Korea", "Seoul"), ("North Korea", "Pyongyang"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Sri Lanka", "Colombo|Sri Jayawardenepura Kotte"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Malaysia", "Kuala Lumpur"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Singapore", "Singapore"), ("Mongolia", "Ulaanbaatar|Ulan Bator"),
    ("Afghanistan", "Kabul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Israel", "Jerusalem"), ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
    ("Qatar", "Doha"), ("Kuwait", "Kuwait City"), ("Oman", "Muscat"), ("Yemen", "Sanaa|Sana'a"),
    ("United States", "Washington"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
    ("Jamaica", "Kingston"), ("Guatemala", "Guatemala City"), ("Panama", "Panama City"),
    ("Costa Rica", "San Jose"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Bolivia", "Sucre|La Paz"), ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Fiji", "Suva"), ("Papua New Guinea", "Port Moresby"),
    ("Kazakhstan", "Astana"), ("Uzbekistan", "Tashkent"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
    ("Azerbaijan", "Baku"), ("Belarus", "Minsk"), ("Moldova", "Chisinau"), ("Albania", "Tirana"),
    ("Cyprus", "Nicosia"), ("Malta", "Valletta"), ("Luxembourg", "Luxembourg"),
)  # fmt: skip
SYMBOLS = (
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"),
    ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"),
    ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"),
    ("gold", "Au"), ("tin", "Sn"), ("lead", "Pb"), ("mercury", "Hg"), ("nickel", "Ni"), ("cobalt", "Co"),
    ("platinum", "Pt"), ("titanium", "Ti"), ("chromium", "Cr"), ("manganese", "Mn"), ("bromine", "Br"),
    ("krypton", "Kr"), ("xenon", "Xe"), ("radon", "Rn"), ("tungsten", "W"), ("barium", "Ba"), ("boron", "B"),
    ("beryllium", "Be"), ("strontium", "Sr"), ("caesium", "Cs"), ("plutonium", "Pu"),
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small|little"), ("up", "down"), ("open", "closed|shut"), ("fast", "slow"),
    ("happy", "sad|unhappy"), ("dark", "light|bright"), ("day", "night"), ("early", "late"), ("empty", "full"),
    ("hard", "soft|easy"), ("high", "low"), ("young", "old"), ("wet", "dry"), ("left", "right"),
    ("black", "white"), ("rich", "poor"), ("push", "pull"), ("strong", "weak"), ("tall", "short"),
    ("thick", "thin"), ("win", "lose"), ("buy", "sell"), ("always", "never"), ("inside", "outside"),
    ("begin", "end|finish"), ("true", "false"), ("friend", "enemy|foe"), ("love", "hate"), ("north", "south"),
    ("east", "west"), ("summer", "winter"), ("question", "answer"), ("clean", "dirty"), ("loud", "quiet|soft"),
    ("first", "last"), ("heavy", "light"), ("give", "take|receive"), ("good", "bad|evil"),
    ("remember", "forget"), ("deep", "shallow"), ("cheap", "expensive"), ("safe", "dangerous|unsafe"),
    ("ancient", "modern"), ("accept", "reject|refuse"), ("arrive", "depart|leave"), ("sweet", "sour|bitter"),
    ("above", "below|beneath|under"), ("before", "after"), ("laugh", "cry"),
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip


@dataclass(frozen=True)
class Fact:
    """A question with a known short answer. ``answers``: the accepted answers, "|"-separated; ``match``: how an
    answer is marked ("words", "symbol" or "number", see the module's docstring)."""

    kind: str
    question: str
    answers: str
    match: str
    reply: str  # a one-sentence right answer: the training target

    @property
    def prompt(self) -> str:
        return f"{self.question} {SUFFIX}"

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(self.question.encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT

    def example(self) -> ChatExample:
        return ChatExample.from_prompt(self.prompt, self.reply, source=f"fact:{self.kind}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(answers: str) -> str:
    return answers.split("|")[0]


def all_facts(seed: int = 0) -> list[Fact]:
    """Every question of every kind, in a fixed order (the arithmetic drawn from ``seed``)."""
    facts = [
        Fact("capital", f"What is the capital of {c}?", a, "words", f"The capital of {c} is {_first(a)}.")
        for c, a in CAPITALS
    ]
    facts += [
        Fact("symbol", f"What is the chemical symbol for {e}?", s, "symbol", f"The chemical symbol for {e} is {s}.")
        for e, s in SYMBOLS
    ]
    facts += [
        Fact("opposite", f"What is the opposite of {w}?", a, "words", f"The opposite of {w} is {_first(a)}.")
        for w, a in OPPOSITES
    ]
    for names, unit in ((WEEKDAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(names):
            after, before = names[(i + 1) % len(names)], names[i - 1]
            facts.append(Fact("sequence", f"Which {unit} comes after {name}?", after, "words",
                              f"The {unit} after {name} is {after}."))  # fmt: skip
            facts.append(Fact("sequence", f"Which {unit} comes before {name}?", before, "words",
                              f"The {unit} before {name} is {before}."))  # fmt: skip
    for source, target, factor in UNITS:
        for n in range(2, 13):
            q = f"How many {target} are in {n} {source}?"
            facts.append(Fact("conversion", q, str(n * factor), "number", f"There are {n * factor} {target} in {n} "
                              f"{source}."))  # fmt: skip
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < 300:
        op = rng.choice("+-×")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "×" else (rng.randint(2, 99), rng.randint(2, 99))
        if op == "-" and b > a:
            a, b = b, a
        q = f"What is {a} {op} {b}?"
        if q in seen:
            continue
        seen.add(q)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        facts.append(Fact("arithmetic", q, str(value), "number", f"{a} {op} {b} = {value}."))
    return facts


def split_facts(seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """(training, held-out) questions: disjoint by construction."""
    facts = all_facts(seed)
    return [f for f in facts if not f.held_out], [f for f in facts if f.held_out]


def fact_mcqs(facts: list[Fact], seed: int = 0) -> list[MCQ]:
    """Multiple-choice versions of the facts with a table answer (capitals, symbols, opposites, weekdays and
    months): three distractors drawn from the other answers of the same kind, the right option's position uniform,
    deterministic given ``seed``. Questions the model may know, unlike the generated arithmetic ones: what an
    uncertainty head can learn to tell apart."""
    pool: dict[str, list[str]] = {}
    for f in all_facts():
        if f.match != "number":
            pool.setdefault(f.kind, [])
            if _first(f.answers) not in pool[f.kind]:
                pool[f.kind].append(_first(f.answers))
    rng = random.Random(seed)
    questions = []
    for f in facts:
        if f.match == "number":
            continue
        accepted = set(f.answers.split("|"))
        wrong = rng.sample([a for a in pool[f.kind] if a not in accepted], 3)
        position = rng.randrange(len(LETTERS))
        choices = (*wrong[:position], _first(f.answers), *wrong[position:])
        questions.append(MCQ(f.question, choices, LETTERS[position], f"fact:{f.kind}", 0))
    return questions


# ----- marking -------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")  # unsigned: every expected answer is positive


def _fold(text: str) -> str:
    """Lower case, accents folded, punctuation to spaces, one space between words."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def _answer_number(question: str, answer: str) -> str | None:
    """The number an answer gives: the first after its last "=", else its first number that does not restate one
    of the question's (each of those skipped once), else its first number."""
    if "=" in answer:
        after = _numbers(answer.rsplit("=", 1)[1])
        return after[0] if after else None
    numbers = _numbers(answer)
    asked = _numbers(question)
    for n in numbers:
        if n in asked:
            asked.remove(n)
        else:
            return n
    return numbers[0] if numbers else None


def is_correct(fact: Fact, answer: str) -> bool:
    """Whether ``answer`` gives the fact's answer, by the rule of its ``match`` (the module's docstring)."""
    if fact.match == "number":
        return _answer_number(fact.question, answer) == fact.answers
    if fact.match == "symbol":
        return re.search(rf"(?<![A-Za-z]){re.escape(fact.answers)}(?![A-Za-z])", answer) is not None
    words = " " + " ".join(_fold(answer).split()[:30]) + " "
    return any(f" {_fold(a)} " in words for a in fact.answers.split("|"))
