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
from olmo_tap.verify.side_answers import replay_side_answer, side_transcript

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


def auditor_similarity(
    name: str, hydra: Any, tokenizer: Any, given: Similarity | None = None
) -> tuple[Similarity | None, str]:
    """The similarity ``name`` to recompute recorded scores with (``given``, else built on ``hydra``), or None and
    why when it cannot be loaded here (an NLI checkpoint the auditor lacks): then that step is reported as not
    checked rather than passed."""
    if given is not None:
        return given, ""
    try:
        return make_similarity(name, hydra, tokenizer), ""
    except ValueError as e:
        return None, str(e)


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
        settings_i = {**sample_settings, "seed": sample["seed"]}
        transcript = side_transcript(data.get("model"), settings_i, data["prompt_ids"], sample)
        replay = replay_side_answer(audit_answer, transcript, sample.get("text"))
        rows.append({"seed": sample["seed"], "honest": replay.honest, "label": replay.label, "reason": replay.reason})
        texts.append(replay.text)
        if not replay.honest:
            return dishonest(f"sample {i}: {replay.reason}", rows=rows)

    question = record["question"]
    if question not in tokenizer.decode(data["prompt_ids"], skip_special_tokens=True):
        return dishonest("the question the similarity read is not in the prompt", rows=rows)
    similarity, why_not = auditor_similarity(record["similarity"], hydra, tokenizer, similarity)
    checked, note = similarity is not None, f"; the matrix was not recomputed ({why_not})" if why_not else ""
    if similarity is not None:
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
