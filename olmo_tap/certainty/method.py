"""Which certainty an answer gets, and the ``certainty`` object a response carries.

A request asks for one of ``CHOICES``:

- ``auto``: a multiple-choice question (options laid out in the user's last message, ``routing.detect_mcq``)
  gets the uncertainty head's p(correct) when the model has one; anything else (and multiple choice on a model
  without that head) gets Kernel Language Entropy over ``N_SAMPLES`` sampled answers;
- ``mcq``: the uncertainty head, whatever the message looks like; ``kle``: KLE, whatever it looks like;
- ``off``: none.

``cheap`` is the chat-completions default (a plain completion stays fast): ``auto``'s choice for multiple choice
(one extra uncached pass), and no certainty for free text, with the reason said (KLE decodes N more answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from olmo_tap.certainty.kle import N_SAMPLES
from olmo_tap.certainty.routing import detect_mcq

Choice = Literal["auto", "mcq", "kle", "off", "cheap"]
CHOICES: tuple[str, ...] = ("auto", "mcq", "kle", "off")
UNCERTAINTY_HEAD = "uncertainty_head"
KLE = "kle"
ABSTAINED = "the jury abstained: there is no answer to compare the samples with"


@dataclass(frozen=True)
class CertaintyPlan:
    """What an answer's certainty will be: ``method`` (``"uncertainty_head"``, ``"kle"`` or None), why none
    when None, what was asked and whether the message reads as multiple choice."""

    method: str | None
    requested: str
    detected_mcq: bool
    reason: str | None = None

    @property
    def mcq(self) -> bool:
        return self.method == UNCERTAINTY_HEAD

    @property
    def kle(self) -> bool:
        return self.method == KLE

    def unavailable(self) -> dict[str, Any]:
        """The certainty object of an answer that has none (``method`` None), with the reason."""
        return {**self._head(), "method": None, "value": None, "reason": self.reason}

    def failed(self, reason: str) -> dict[str, Any]:
        """The certainty object of a KLE that could not be computed for this answer, with the reason."""
        return {**self._head(), "method": KLE, "value": None, "reason": reason}

    def from_head(self, p_correct: float | None) -> dict[str, Any]:
        reason = None
        if p_correct is None:
            reason = "the uncertainty head scored nothing: the jury abstained, or question + answer exceed the context"
        return {**self._head(), "method": UNCERTAINTY_HEAD, "value": p_correct, "reason": reason}

    def from_kle(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**self._head(), **record, "reason": None}

    def _head(self) -> dict[str, Any]:
        return {"requested": self.requested, "detected_mcq": self.detected_mcq}


def plan_certainty(requested: str, last_user_message: str, has_uncertainty_head: bool) -> CertaintyPlan:
    """The certainty for a request's choice and its last user message (ValueError for an unknown choice)."""
    if requested not in (*CHOICES, "cheap"):
        raise ValueError(f"certainty must be one of {', '.join(CHOICES)}, got {requested!r}")
    detected = detect_mcq(last_user_message)
    no_head = "this model has no uncertainty head (it scores multiple-choice answers)"
    if requested == "off":
        return CertaintyPlan(None, requested, detected, "certainty was turned off for this request")
    if requested == "kle":
        return CertaintyPlan(KLE, requested, detected)
    if requested == "mcq":
        if has_uncertainty_head:
            return CertaintyPlan(UNCERTAINTY_HEAD, requested, detected)
        return CertaintyPlan(None, requested, detected, no_head)
    if detected and has_uncertainty_head:
        return CertaintyPlan(UNCERTAINTY_HEAD, requested, detected)
    if requested == "auto":
        return CertaintyPlan(KLE, requested, detected)
    kind = f"multiple choice, but {no_head}" if detected else "free text"
    return CertaintyPlan(
        None,
        requested,
        detected,
        f"{kind}: Kernel Language Entropy was not asked for (it decodes {N_SAMPLES} more answers); "
        "send certainty 'auto' or 'kle'",
    )
