"""The claim ledger (olmo_tap.certainty.claims): splitting, confidence arithmetic, tiers, errors. Fast, no model."""

from __future__ import annotations

import pytest

from olmo_tap.benchmarks.sentence_splitters import CASES, CASES_ADDED
from olmo_tap.certainty.claims import GUIDANCE, HIGH, MODERATE, NO_SAMPLES, claim_ledger, claim_tier, split_claims

# nupunkt's measured misses (results/certainty/sentence_splitters.md): a sentence that starts in lower case or with a
# number stays joined to the one before. Strict: a library update that fixes them fails here, to be noticed.
KNOWN_MISSES = {
    "iPhones were launched in 2007. iPads followed in 2010.",
    "Mercury is the closest planet to the Sun. 88 days make its year.",
}
LABELLED = [
    pytest.param(
        text, expected, id=f"{batch}{i}", marks=[pytest.mark.xfail(strict=True)] if text in KNOWN_MISSES else []
    )
    for batch, cases in (("first", CASES), ("added", CASES_ADDED))
    for i, (text, expected) in enumerate(cases)
]


@pytest.mark.parametrize(("text", "expected"), LABELLED)
def test_split_claims_labelled_cases(text: str, expected: list[str]) -> None:
    assert split_claims(text) == expected


def test_split_claims_markdown_and_fillers() -> None:
    answer = (
        "Sure!\n# Title\n> Quoted claim.\n- first item\n+ second item\n• third item\n10) tenth item\n---\n"
        "```\nx = 1. y = 2.\n```\nYes.\nHope this helps!"
    )
    assert split_claims(answer) == ["Quoted claim.", "first item", "second item", "third item", "tenth item", "Yes."]
    assert split_claims("") == []
    assert split_claims("   \n\n") == []
    # a leading "-5" or "1.5" is a number, not a list marker
    assert split_claims("-5 °C is cold.\n1.5 is a number.") == ["-5 °C is cold.", "1.5 is a number."]


def _contains(pairs: list[tuple[str, str]]) -> list[float]:
    """A stand-in for an NLI model: a claim is supported when its text occurs in the premise."""
    return [1.0 if claim in premise else 0.0 for premise, claim in pairs]


def test_ledger_confidence_is_the_share_of_supporting_samples() -> None:
    answer = "Paris is the capital of France. The Seine flows through Paris."
    samples = [
        "Paris is the capital of France. The Seine flows through Paris.",
        "Paris is the capital of France.",
        "Paris is the capital of France. Lyon is big.",
        "The Seine flows through Paris.",
    ]
    ledger = claim_ledger(answer, samples, _contains)
    assert ledger == {
        "claims": [
            {"text": "Paris is the capital of France.", "confidence": 0.75, "confidence_level": "moderate",
             "guidance": GUIDANCE["moderate"]},
            {"text": "The Seine flows through Paris.", "confidence": 0.5, "confidence_level": "low",
             "guidance": GUIDANCE["low"]},
        ],
        "overall_confidence": 0.62,  # (0.75 + 0.5) / 2 = 0.625, rounded half to even by round()
    }  # fmt: skip


def test_ledger_makes_one_batched_call_in_claim_order() -> None:
    calls: list[list[tuple[str, str]]] = []

    def support(pairs: list[tuple[str, str]]) -> list[float]:
        calls.append(pairs)
        return [1.0] * len(pairs)

    ledger = claim_ledger("A is true. B is true.", ["s1", "s2"], support)
    assert calls == [[("s1", "A is true."), ("s2", "A is true."), ("s1", "B is true."), ("s2", "B is true.")]]
    assert [c["confidence_level"] for c in ledger["claims"]] == ["high", "high"]
    assert ledger["overall_confidence"] == 1.0
    assert all(c["guidance"] == "" for c in ledger["claims"])


def test_ledger_rounds_and_tiers_the_rounded_value() -> None:
    # 0.7999 rounds to 0.8: shown as 0.8, so it is "high", never a "moderate" 0.8
    ledger = claim_ledger("One claim.", ["s"], lambda pairs: [0.7999])
    assert ledger["claims"][0]["confidence"] == 0.8
    assert ledger["claims"][0]["confidence_level"] == "high"


def test_ledger_without_samples_or_claims() -> None:
    ledger = claim_ledger("A is true. B is true.", [], _contains)
    assert ledger["overall_confidence"] is None
    assert ledger["claims"] == [
        {"text": t, "confidence": None, "confidence_level": None, "guidance": NO_SAMPLES}
        for t in ("A is true.", "B is true.")
    ]

    def never(pairs: list[tuple[str, str]]) -> list[float]:
        raise AssertionError("support must not be called when there is nothing to score")

    assert claim_ledger("Sure!", ["a sample"], never) == {"claims": [], "overall_confidence": None}
    assert claim_ledger("", [], never) == {"claims": [], "overall_confidence": None}


def test_ledger_clips_float_noise() -> None:
    ledger = claim_ledger("One claim.", ["a", "b"], lambda pairs: [1.0 + 1e-9, -1e-9])
    assert ledger["claims"][0]["confidence"] == 0.5


def test_ledger_takes_array_scores() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    for scores in (np.array([0.9, 0.7], dtype=np.float32), torch.tensor([0.9, 0.7])):
        ledger = claim_ledger("One claim.", ["a", "b"], lambda pairs, s=scores: s)
        assert ledger["claims"][0]["confidence"] == 0.8


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([1.0], "returned 1 scores for 2"),
        ([1.0, 1.0, 1.0], "returned 3 scores for 2"),
        ([1.0, 1.1], "outside [0, 1]"),
        ([-0.01, 0.5], "outside [0, 1]"),
        ([0.5, float("nan")], "not a number"),
        ([0.5, "0.5"], "not a number"),
        ([0.5, None], "not a number"),
        ([0.5, True], "not a number"),
        (None, "sequence of scores"),
    ],
)
def test_ledger_rejects_bad_support_scores(scores: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        claim_ledger("One claim.", ["a", "b"], lambda pairs: scores)  # type: ignore[arg-type,return-value]


def test_ledger_rejects_non_string_samples() -> None:
    with pytest.raises(ValueError, match="samples must be strings"):
        claim_ledger("One claim.", [None], _contains)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("confidence", "level"),
    [(1.0, "high"), (HIGH, "high"), (0.7999, "moderate"), (MODERATE, "moderate"), (0.6499, "low"), (0.0, "low")],
)
def test_tiers_at_the_boundaries(confidence: float, level: str) -> None:
    assert claim_tier(confidence) == (level, GUIDANCE[level])
    assert (HIGH, MODERATE) == (0.80, 0.65)
    assert GUIDANCE["high"] == "" and GUIDANCE["moderate"] and GUIDANCE["low"]


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "0.9", True])
def test_tier_rejects_non_confidences(bad: object) -> None:
    with pytest.raises(ValueError, match=r"number in \[0, 1\]"):
        claim_tier(bad)  # type: ignore[arg-type]
