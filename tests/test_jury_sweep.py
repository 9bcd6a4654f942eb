"""The settings sweep of the default jury: it validates on training facts the configuration did not train on, and
its paired interval for the jury's margin over one head behaves as an interval of a difference should."""

from __future__ import annotations

import numpy as np

from olmo_tap.benchmarks.jury_sweep import START, VARIANTS, examples_for, validation_split
from olmo_tap.benchmarks.signals import Answer, margin_interval
from olmo_tap.train.facts import split_facts


def test_validation_questions_are_training_facts_left_out_of_every_configuration():
    fit, validation = validation_split()
    train, held_out = split_facts()
    assert {f.question for f in fit} | {f.question for f in validation} == {f.question for f in train}
    assert not {f.question for f in fit} & {f.question for f in validation}
    assert not {f.question for f in validation} & {f.question for f in held_out}  # the test half stays untouched
    assert len(validation) >= 90
    left_out = {f.example().key for f in validation}
    for name, variant in VARIANTS.items():
        if variant is None:
            continue
        keys = {e.key for e in examples_for(variant, fit)}
        assert not keys & left_out, name
        changed = {k for k, v in variant.config.to_dict().items() if v != START.to_dict()[k]}
        assert len(changed) <= 2 and (changed or name in {"start", "no-mcq", "depth6"}), (name, changed)


def _answers(name: str, suspicion: list[float], wrong: list[bool]) -> list[Answer]:
    return [
        Answer(name, f"q{i}", "", not w, {"mean entropy": s})
        for i, (s, w) in enumerate(zip(suspicion, wrong, strict=True))
    ]


def test_margin_interval_is_zero_for_equal_decoders_and_positive_for_a_better_one():
    rng = np.random.default_rng(0)
    wrong = (rng.random(120) < 0.5).tolist()
    noise = rng.random(120).tolist()
    informative = [w + 0.3 * n for w, n in zip(wrong, noise, strict=True)]  # separates wrong from right
    same = margin_interval(
        _answers("jury", noise, wrong), "mean entropy", _answers("single", noise, wrong), "mean entropy"
    )
    assert same == (0.0, 0.0)
    low, high = margin_interval(
        _answers("jury", informative, wrong), "mean entropy", _answers("single", noise, wrong), "mean entropy"
    )
    assert 0 < low < high <= 1


def test_held_out_multiple_choice_shares_no_question_with_any_training_set():
    from olmo_tap.benchmarks.signals import held_out_mcqs
    from olmo_tap.train.default_jury import MCQ_TRAIN, uncertainty_questions
    from olmo_tap.train.mcq import format_mcq, generate_mcqs

    held = held_out_mcqs()
    trained = uncertainty_questions() + generate_mcqs(*MCQ_TRAIN)
    assert not {format_mcq(q) for q in held} & {format_mcq(q) for q in trained}
    held_facts = [q for q in held if q.kind.startswith("fact:")]
    trained_facts = [q for q in trained if q.kind.startswith("fact:")]
    assert len(held_facts) >= 100 and len(trained_facts) >= 400
    assert not {q.question for q in held_facts} & {q.question for q in trained_facts}  # other facts, not other options
