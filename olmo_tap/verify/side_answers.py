"""Answers a transcript records beside its own (KLE's sampled answers, the robustness probe's attacked answers):
each is replayed through the jury as an answer of its own, from what the record keeps of it (its settings, prompt,
tokens and the jury's path), and its recorded text must be its tokens' decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from olmo_tap.inference.transcript import FORMAT, VERSION, content_digest

# What a side answer records of the jury's path: which tokens replaced a rejected draft, and the drafts. The rest
# of its output is derived, and the replay rebuilds it.
PATH_FIELDS = ("resampled_idxs", "original_token_ids")


def side_transcript(
    model: str | None, settings: dict[str, Any], prompt_ids: list[int], answer: dict[str, Any]
) -> dict[str, Any]:
    """The transcript ``answer`` (its ``token_ids``, ``draft_head`` and path) would have as an answer of its own
    to ``prompt_ids``, decoded with ``settings``."""
    # A decoder records its decider as both draft_head and head (None for naive averaging).
    decider = answer["draft_head"]
    transcript = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "settings": {**settings, "draft_head": decider, "head": decider},
        "prompt_ids": prompt_ids,
        "token_ids": answer["token_ids"],
    }
    transcript["digest"] = content_digest(transcript)
    transcript["output"] = {k: answer[k] for k in PATH_FIELDS}
    return transcript


def replayed(report: Any) -> tuple[bool, str]:
    """A side answer's audit, judged on what it records: every decision and the ending reproduced, and no field
    wrong other than the derived ones it does not record."""
    if report.inconsistent_positions or not report.ending_consistent:
        return False, report.reason
    wrong = [m for m in report.field_mismatches if not m.missing]
    if wrong:
        return False, f"{wrong[0].field} is {wrong[0].claimed!r}, the replay gives {wrong[0].expected!r}"
    return True, ""


@dataclass
class SideReplay:
    honest: bool
    reason: str
    text: str  # the decoding of its tokens, as the replay folds them
    label: str


def replay_side_answer(
    audit_answer: Callable[[dict[str, Any]], Any], transcript: dict[str, Any], recorded_text: str | None
) -> SideReplay:
    """Replay one side answer (``audit_answer``: ``audit_poe`` with the caller's model and tolerances) and check
    its ``recorded_text`` against its tokens."""
    report = audit_answer(transcript)
    text = report.replayed_output.text if report.replayed_output is not None else report.text
    ok, why = replayed(report)
    if ok and recorded_text is not None and recorded_text != text:
        ok, why = False, "its recorded text is not its tokens' decoding"
    return SideReplay(ok, why, text, report.label)
