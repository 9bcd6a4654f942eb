"""The short-answer question bank: disjoint splits, enough held-out questions, and the marking rule."""

from __future__ import annotations

import pytest

from olmo_tap.train.facts import SUFFIX, Fact, all_facts, fact_mcqs, is_correct, split_facts


def test_the_splits_are_disjoint_deterministic_and_large_enough():
    train, held_out = split_facts()
    assert len(held_out) >= 300 and len(train) >= 250
    assert not {f.question for f in train} & {f.question for f in held_out}
    assert [f.question for f in all_facts()] == [f.question for f in all_facts()]
    assert len({f.question for f in all_facts()}) == len(all_facts())  # no question twice
    assert {f.kind for f in held_out} == {"capital", "symbol", "opposite", "sequence", "conversion", "arithmetic"}
    for fact in all_facts():
        assert is_correct(fact, fact.reply), fact  # the training reply is marked right
        assert fact.prompt.endswith(SUFFIX)


@pytest.mark.parametrize(
    ("fact", "answer", "right"),
    [
        (Fact("capital", "What is the capital of Peru?", "Lima", "words", ""), "Lima.", True),
        (Fact("capital", "What is the capital of Peru?", "Lima", "words", ""), "The capital is LIMA!", True),
        (Fact("capital", "What is the capital of Peru?", "Lima", "words", ""), "Limassol.", False),
        (Fact("capital", "What is the capital of Peru?", "Lima", "words", ""), "Cusco.", False),
        (Fact("capital", "Capital of Colombia?", "Bogota", "words", ""), "Bogotá", True),  # accents folded
        (Fact("capital", "Capital of Ukraine?", "Kyiv|Kiev", "words", ""), "It is Kiev.", True),
        (Fact("symbol", "Symbol for gold?", "Au", "symbol", ""), "The symbol is Au.", True),
        (Fact("symbol", "Symbol for gold?", "Au", "symbol", ""), "It is au.", False),  # case matters
        (Fact("symbol", "Symbol for gold?", "Au", "symbol", ""), "Aurum", False),
        (Fact("arithmetic", "What is 7 + 5?", "12", "number", ""), "7 + 5 = 12.", True),
        (Fact("arithmetic", "What is 7 + 5?", "12", "number", ""), "12", True),
        (Fact("arithmetic", "What is 7 + 5?", "12", "number", ""), "13, or maybe 12", False),  # the first counts
        (Fact("arithmetic", "What is 45 - 12?", "33", "number", ""), "45-12=33", True),
        (Fact("arithmetic", "What is 7 + 5?", "12", "number", ""), "I do not know.", False),
        (Fact("arithmetic", "What is 44 - 22?", "22", "number", ""), "44 - 22 = 44", False),
        (Fact("arithmetic", "What is 44 - 22?", "22", "number", ""), "22", True),
        (Fact("arithmetic", "What is 44 - 22?", "22", "number", ""), "The answer is 22.", True),
        (Fact("conversion", "How many hours are in 2 days?", "48", "number", ""), "2 days is 48 hours", True),
        (Fact("conversion", "How many minutes are in 3 hours?", "180", "number", ""), "180 minutes in 3 hours", True),
        (Fact("conversion", "How many grams are in 2 kilograms?", "2000", "number", ""), "2,000 grams", True),
    ],
)
def test_marking_rule(fact, answer, right):
    assert is_correct(fact, answer) is right


def test_fact_mcqs_have_one_right_option_and_follow_the_split():
    train, held_out = split_facts()
    questions = fact_mcqs(held_out, seed=2)
    assert questions == fact_mcqs(held_out, seed=2)  # deterministic
    facts = {f.question: f for f in held_out}
    assert {q.kind for q in questions} == {"fact:capital", "fact:symbol", "fact:opposite", "fact:sequence"}
    assert len(questions) == sum(f.match != "number" for f in held_out)  # every table fact, no number
    for q in questions:
        fact = facts[q.question]  # built from held-out facts only
        assert len(set(q.choices)) == 4
        right = [c for c in q.choices if is_correct(fact, c)]
        assert right == [q.correct_choice], (q, right)  # exactly one option is marked right: the answer
    assert {q.answer for q in questions} == set("ABCD")
    assert not {q.question for q in questions} & {q.question for q in fact_mcqs(train, seed=2)}
