"""The audit of a transcript's KLE certainty: were the samples the jury's, and does the value follow from them?

Checked in order; the first failure makes the certainty (and so the transcript) dishonest:

1. the samples' seeds are the ones derived from the answer's seed (``sample_seeds``): nobody picked them;
2. their settings are the answer's, changed only where ``sample_settings`` changes them (the same jury, budget
   and vocabulary; temperature ``SAMPLE_TEMPERATURE``; no multiple-choice scoring);
3. each sample replays through the jury as an answer of its own (``audit_poe`` on the answer's prompt with the
   sample's seed, draft head and tokens), and its recorded text is the decoding of its tokens;
4. the question the similarity read is in the prompt;
5. the matrix is what the named similarity gives for the samples' texts (``MATRIX_TOLERANCE``; when the
   similarity cannot be loaded here, e.g. an NLI checkpoint the auditor lacks, this step is reported as not
   checked rather than passed);
6. entropy and value are what ``olmo_tap.certainty.kle`` computes from the recorded matrix (1e-9).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from olmo_tap.certainty.kle import KERNEL_T, kernel_language_entropy, kle_certainty
from olmo_tap.certainty.sampled import SAMPLE_TEMPERATURE, SHARED_SETTINGS, sample_seeds
from olmo_tap.certainty.similarity import Similarity, make_similarity, similarity_matrix
from olmo_tap.inference.transcript import FORMAT, VERSION, content_digest

# The matrix is recorded to 6 decimals; a model's similarity recomputed in another thread count may move the
# last digits of a float32 product.
MATRIX_TOLERANCE = 1e-4
VALUE_TOLERANCE = 1e-9


@dataclass
class CertaintyAudit:
    honest: bool
    reason: str
    matrix_checked: bool
    samples: list[dict[str, Any]] = field(default_factory=list)  # per sample: seed, honest, label, reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_transcript(data: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """The transcript a KLE sample would have as an answer of its own."""
    record = data["certainty"]
    # A decoder records its decider as both draft_head and head (None for naive averaging).
    decider = sample["draft_head"]
    settings = {**record["sample_settings"], "seed": sample["seed"], "draft_head": decider, "head": decider}
    transcript = {
        "format": FORMAT,
        "version": VERSION,
        "model": data.get("model"),
        "settings": settings,
        "prompt_ids": data["prompt_ids"],
        "token_ids": sample["token_ids"],
    }
    transcript["digest"] = content_digest(transcript)
    # Only the path is recorded (the rest of a sample's output is derived): the replay takes its decisions from it.
    transcript["output"] = {k: sample[k] for k in PATH_FIELDS}
    return transcript


PATH_FIELDS = ("resampled_idxs", "original_token_ids")


def replayed(report: Any) -> tuple[bool, str]:
    """A sample's audit, judged on what a sample records: every decision and the ending reproduced, and no field
    wrong other than the derived ones it does not record."""
    if report.inconsistent_positions or not report.ending_consistent:
        return False, report.reason
    wrong = [m for m in report.field_mismatches if m.claimed != "(missing)"]
    return (not wrong, "" if not wrong else f"{wrong[0].field} is {wrong[0].claimed!r}, the replay gives "
            f"{wrong[0].expected!r}")  # fmt: skip


def audit_certainty(
    data: dict[str, Any],
    hydra: Any,
    tokenizer: Any,
    audit_answer: Callable[[dict[str, Any]], Any],
    similarity: Similarity | None = None,
) -> CertaintyAudit:
    """Audit ``data["certainty"]`` (a checked transcript's KLE record). ``audit_answer`` audits one transcript
    (``audit_poe`` with the caller's model and tolerances); ``similarity``: the one to recompute the matrix with
    (default: the recorded name's, built on ``hydra``)."""
    record, settings = data["certainty"], data["settings"]
    samples = record["samples"]
    n = len(samples)

    def dishonest(reason: str, checked: bool = False, rows: list[dict[str, Any]] | None = None) -> CertaintyAudit:
        return CertaintyAudit(False, reason, checked, rows or [])

    seeds = sample_seeds(settings["seed"], n)
    if [s["seed"] for s in samples] != seeds:
        return dishonest("the samples' seeds are not the ones derived from the answer's seed")
    sample_settings = record["sample_settings"]
    changed = [k for k in SHARED_SETTINGS if sample_settings.get(k) != settings.get(k)]
    if changed:
        return dishonest(f"the samples' settings differ from the answer's in {', '.join(changed)}")
    temperatures = (sample_settings.get("temperature"), record["temperature"])
    if any(not math.isclose(float(t), SAMPLE_TEMPERATURE) for t in temperatures):
        return dishonest(f"the samples were not drawn at temperature {SAMPLE_TEMPERATURE:g}")
    if not math.isclose(float(record["kernel_t"]), KERNEL_T):
        return dishonest(f"the heat kernel's time is {record['kernel_t']}, not {KERNEL_T:g}")
    if sample_settings.get("mcq"):
        return dishonest("the samples' settings score them as multiple choice")

    rows, texts = [], []
    for i, sample in enumerate(samples):
        report = audit_answer(sample_transcript(data, sample))
        text = report.replayed_output.text if report.replayed_output is not None else report.text
        ok, why = replayed(report)
        if ok and sample.get("text", text) != text:
            ok, why = False, "its recorded text is not its tokens' decoding"
        rows.append({"seed": sample["seed"], "honest": ok, "label": report.label, "reason": why})
        texts.append(text)
        if not ok:
            return dishonest(f"sample {i}: {why}", rows=rows)

    question = record["question"]
    if question not in tokenizer.decode(data["prompt_ids"], skip_special_tokens=True):
        return dishonest("the question the similarity read is not in the prompt", rows=rows)
    checked, note = True, ""
    try:
        similarity = similarity or make_similarity(record["similarity"], hydra, tokenizer)
    except ValueError as e:
        checked, note = False, f"; the matrix was not recomputed ({e})"
    if checked:
        expected = np.round(similarity_matrix(similarity, texts, question), 6)
        worst = float(np.abs(expected - np.asarray(record["matrix"], dtype=np.float64)).max())
        if worst > MATRIX_TOLERANCE:
            return dishonest(
                f"the similarity matrix is not what {record['similarity']} gives for the samples "
                f"(off by up to {worst:.3g})",
                True,
                rows,
            )
    entropy = kernel_language_entropy(record["matrix"], record["kernel_t"])
    if abs(entropy - record["entropy"]) > VALUE_TOLERANCE:
        return dishonest(f"the entropy is {entropy:.9g} nats for the recorded matrix, not {record['entropy']}")
    value = kle_certainty(entropy, n)
    if abs(value - record["value"]) > VALUE_TOLERANCE:
        return dishonest(f"the certainty is {value:.9g} for the recorded matrix, not {record['value']}")
    return CertaintyAudit(True, f"{n} samples replayed, value {value:.3f} follows{note}", checked, rows)
