"""The claim ledger: an answer split into claims, each with a confidence measured against other sampled answers.

Splitting (``split_claims``), the rules exactly:

1. fenced code blocks (between lines starting with ``````` or ``~~~``) are dropped: code is not a claim;
2. every line break ends a claim (model answers do not hard-wrap prose), blank lines are skipped, and Markdown
   headings (``#`` to ``######``) are dropped: a title asserts nothing;
3. from each remaining line one leading blockquote marker (``>``) and one list marker (``-``, ``*``, ``+``, ``•``,
   or a number of up to three digits followed by ``.`` or ``)``, then a space) are stripped, and the rest is split
   into sentences by ``SPLITTER`` (chosen by measurement: ``results/certainty/sentence_splitters.md``);
4. a sentence is dropped when it has no letter or digit ("---", "**"), when it ends with a colon (it introduces
   what follows: "Here are three facts:"), or when, lower-cased and stripped of trailing ``.!`` and spaces, it is
   one of ``FILLERS`` ("Sure!", "Hope this helps!"). Short answers such as "Yes." and "No." are kept: they are
   the claim.

Confidence (``claim_ledger``): a claim's confidence is the mean, over the sampled answers, of
``support(premise=sample, hypothesis=claim)``, a score in [0, 1] (for instance P(entailment) + 0.5 P(neutral) from
an NLI model), rounded to 2 decimals. Its level and guidance come from ``claim_tier`` of the *rounded* confidence,
so the number shown and its level always agree: "high" from ``HIGH`` (0.80), "moderate" from ``MODERATE`` (0.65),
"low" below (the original system's thresholds). ``overall_confidence`` is the mean of the rounded claim
confidences, rounded to 2 decimals. With no samples every claim gets confidence and level None and the guidance
``NO_SAMPLES``, and overall is None; with no claims the list is empty and overall is None. The schema is the
original ``/api/analyse`` one: ``{"claims": [{"text", "confidence", "confidence_level", "guidance"}],
"overall_confidence"}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache
from numbers import Real
from typing import Any

from olmo_tap.certainty.support import check_support_scores

SPLITTER = "nupunkt"  # the sentence splitter the project depends on (see the module docstring, rule 3)

HIGH = 0.80
MODERATE = 0.65
GUIDANCE = {
    "high": "",
    "moderate": "Check this against a reliable source.",
    "low": "Likely unsupported: do not rely on it without an independent source.",
}
NO_SAMPLES = "no samples to compare against"

FILLERS = frozenset({
    "sure", "sure thing", "certainly", "of course", "absolutely", "okay", "ok", "great question", "good question",
    "hope this helps", "i hope this helps", "happy to help", "glad to help", "let me know if you have any questions",
    "let me know if you have any other questions", "let me know if you need anything else",
})  # fmt: skip

_FENCE = re.compile(r"^[ \t]*(?:```|~~~)")
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}(?:[ \t]|$)")
_MARKERS = re.compile(r"^[ \t]*(?:>[ \t]?)?[ \t]*(?:[-*+•]|\d{1,3}[.)])?[ \t]+|^[ \t]*>[ \t]?")
_HAS_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


@cache
def _default_sentences() -> Callable[[str], list[str]]:
    try:
        import nupunkt  # its trained model ships inside the package: nothing is downloaded
    except ImportError:
        raise ImportError(f"the claim ledger needs {SPLITTER}: pip install {SPLITTER} (a project dependency)") from None
    return nupunkt.sentences


def _is_claim(sentence: str) -> bool:
    if not _HAS_LETTER_OR_DIGIT.search(sentence) or sentence.endswith(":"):
        return False
    return sentence.lower().rstrip(".! ") not in FILLERS


def split_claims(text: str, sentences: Callable[[str], list[str]] | None = None) -> list[str]:
    """The claims of an answer, in order (the rules are the module docstring's). ``sentences`` replaces the
    sentence splitter (the comparison of libraries uses it); by default ``SPLITTER``."""
    split = sentences or _default_sentences()
    claims: list[str] = []
    in_code = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            continue
        if in_code or not line.strip() or _HEADING.match(line):
            continue
        body = _MARKERS.sub("", line, count=1).strip()
        claims += [s for s in (part.strip() for part in split(body)) if s and _is_claim(s)]
    return claims


def claim_tier(confidence: float) -> tuple[str, str]:
    """(level, guidance) of a confidence in [0, 1]: "high" from ``HIGH``, "moderate" from ``MODERATE``, "low"
    below; guidance is empty for "high"."""
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0.0 <= confidence <= 1.0:
        raise ValueError(f"a confidence is a number in [0, 1], got {confidence!r}")
    level = "high" if confidence >= HIGH else "moderate" if confidence >= MODERATE else "low"
    return level, GUIDANCE[level]


def claim_ledger(
    answer: str, samples: Sequence[str], support: Callable[[list[tuple[str, str]]], Sequence[float]]
) -> dict[str, Any]:
    """Each claim of ``answer`` with its confidence against ``samples`` (other answers to the same prompt), its
    level and guidance, and the overall confidence (the rules are the module docstring's). ``support`` is called
    once, with every (premise=sample, hypothesis=claim) pair, claim by claim and sample by sample within a claim,
    and must return one score in [0, 1] per pair."""
    if any(not isinstance(s, str) for s in samples):
        raise ValueError("samples must be strings (the other sampled answers)")
    claims = split_claims(answer)
    if not samples:
        rows = [{"text": c, "confidence": None, "confidence_level": None, "guidance": NO_SAMPLES} for c in claims]
        return {"claims": rows, "overall_confidence": None}
    if not claims:
        return {"claims": [], "overall_confidence": None}
    pairs = [(sample, claim) for claim in claims for sample in samples]
    scores = check_support_scores(support(pairs), len(pairs))
    n, rows = len(samples), []
    for k, claim in enumerate(claims):
        confidence = round(sum(scores[k * n : (k + 1) * n]) / n, 2)
        level, guidance = claim_tier(confidence)
        rows.append({"text": claim, "confidence": confidence, "confidence_level": level, "guidance": guidance})
    overall = round(sum(r["confidence"] for r in rows) / len(rows), 2)
    return {"claims": rows, "overall_confidence": overall}
