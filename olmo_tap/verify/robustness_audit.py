"""The audit of a transcript's robustness record: were the attacked answers the jury's, to the answer's own
conversation with the bank's suffixes, and do the flips and the value follow from them?

Checked in order (the probe's rules are ``olmo_tap.robustness.probe``'s); the first failure makes the record (and
so the transcript) dishonest:

1. the recorded conversation is the answer's: its chat encoding is the transcript's prompt;
2. the attacked answers were decoded with the answer's settings (the same jury, budget, vocabulary, temperature,
   seed and draft head; no multiple-choice scoring), and the record's seed is the answer's;
3. the suffixes are the first ``K_SUFFIXES`` of the attack bank, and the record names that bank (with no bank to
   compare against, e.g. an auditor without it, this step is reported as not checked rather than passed; without
   it the replay still pins each suffix wherever the attacked answer depends on it);
4. each attacked answer replays through the jury as an answer of its own (``audit_poe`` on the conversation with
   its suffix appended, exactly as the probe built it) and its recorded text is its tokens' decoding;
5. the question is typed as the probe types it (multiple choice or free text), and each flip, letter and
   similarity is what the flip rule gives for the replayed texts (similarities to ``MATRIX_TOLERANCE``; when the
   similarity cannot be loaded here the recorded ones decide, reported as not recomputed);
6. the flip count (``flips`` and the original's ``flipped``) and ``value = 1 - flips / attempts`` follow (1e-9).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from olmo_tap.certainty.sampled import SHARED_SETTINGS
from olmo_tap.certainty.similarity import Similarity
from olmo_tap.inference.prompts import encode_chat
from olmo_tap.robustness.bank import AttackBank
from olmo_tap.robustness.probe import (
    FLIP_THRESHOLD,
    FREE_TEXT,
    K_SUFFIXES,
    MCQ,
    attack_suffixes,
    attacked_messages,
    is_mcq,
    judge_attacks,
    question_of,
)
from olmo_tap.train.mcq import parse_choice
from olmo_tap.verify.certainty_audit import MATRIX_TOLERANCE, VALUE_TOLERANCE, auditor_similarity
from olmo_tap.verify.side_answers import replay_side_answer, side_transcript

# Settings an attacked answer shares with its answer: the suffix is the only difference.
ATTACK_SHARED_SETTINGS = (*SHARED_SETTINGS, "seed", "temperature", "draft_head", "head")


@dataclass
class RobustnessAudit:
    honest: bool
    reason: str
    suffixes_checked: bool  # against an attack bank
    similarity_checked: bool  # free text: the similarities recomputed (multiple choice: nothing to recompute)
    attacks: list[dict[str, Any]] = field(default_factory=list)  # per attack: suffix, honest, label, reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_robustness(
    data: dict[str, Any],
    hydra: Any,
    tokenizer: Any,
    audit_answer: Callable[[dict[str, Any]], Any],
    clean_text: str,
    bank: AttackBank | None = None,
    similarity: Similarity | None = None,
) -> RobustnessAudit:
    """Audit ``data["robustness"]`` (a checked transcript's record). ``audit_answer`` audits one transcript
    (``audit_poe`` with the caller's model and tolerances); ``clean_text``: the answer's text as the replay
    decodes it; ``bank``: the attack bank to check the suffixes against; ``similarity``: the one to recompute
    free-text similarities with (default: the recorded name's, built on ``hydra``)."""
    record, settings = data["robustness"], data["settings"]
    attacks, messages = record["attacks"], record["messages"]
    checks = {"suffixes_checked": bank is not None, "similarity_checked": False}

    def dishonest(reason: str, rows: list[dict[str, Any]] | None = None) -> RobustnessAudit:
        return RobustnessAudit(False, reason, attacks=rows or [], **checks)

    try:
        prompt_ids = encode_chat(tokenizer, messages=messages)
    except ValueError as e:
        return dishonest(f"the recorded conversation is not one ({e})")
    if prompt_ids != data["prompt_ids"]:
        return dishonest("the recorded conversation is not the answer's: its encoding is not the transcript's prompt")
    if record["seed"] != settings["seed"]:
        return dishonest(f"the record's seed {record['seed']} is not the answer's ({settings['seed']})")
    attack_settings = record["attack_settings"]
    changed = [k for k in ATTACK_SHARED_SETTINGS if attack_settings.get(k) != settings.get(k)]
    if changed:
        return dishonest(f"the attacked answers' settings differ from the answer's in {', '.join(changed)}")
    if attack_settings.get("mcq"):
        return dishonest("the attacked answers' settings score them as multiple choice")
    if any(a["draft_head"] != settings["draft_head"] for a in attacks):
        return dishonest("an attacked answer names another draft head than the answer's (the same seed decides it)")

    suffixes = [a["suffix"] for a in attacks]
    note = ""
    if bank is not None:
        expected = attack_suffixes(bank)
        if record["bank"]["fingerprint"] != bank.fingerprint:
            return dishonest("the record names another attack bank than the auditor's (its model fingerprint differs)")
        if len(suffixes) != len(expected):
            return dishonest(f"the probe attacks with the bank's first {len(expected)} suffixes, not {len(suffixes)}")
        for i, (suffix, wanted) in enumerate(zip(suffixes, expected, strict=True)):
            if suffix != wanted:
                return dishonest(f"attack {i}'s suffix is not entry {i} of the attack bank")
    else:
        note = "; the suffixes were not checked against an attack bank (none given)"
        if len(suffixes) > K_SUFFIXES:
            return dishonest(f"the probe attacks with at most {K_SUFFIXES} suffixes, not {len(suffixes)}")

    rows, texts = [], []
    for i, attack in enumerate(attacks):
        attacked = encode_chat(tokenizer, messages=attacked_messages(messages, attack["suffix"]))
        transcript = side_transcript(data.get("model"), attack_settings, attacked, attack)
        replay = replay_side_answer(audit_answer, transcript, attack["answer"])
        rows.append({"suffix": attack["suffix"], "honest": replay.honest, "label": replay.label,
                     "reason": replay.reason})  # fmt: skip
        texts.append(replay.text)
        if not replay.honest:
            return dishonest(f"attack {i}: {replay.reason}", rows)

    question = question_of(messages)
    mcq = is_mcq(question, bool(settings.get("mcq")))
    kind = MCQ if mcq else FREE_TEXT
    if record["type"] != kind:
        return dishonest(f"the record calls the question {record['type']}; the probe's rule makes it {kind}", rows)
    if not math.isclose(float(record["threshold"]), FLIP_THRESHOLD):
        return dishonest(f"the flip threshold is {record['threshold']}, not {FLIP_THRESHOLD:g}", rows)
    if mcq:
        judged = judge_attacks(clean_text, texts, True, None, question)
        clean_choice = parse_choice(clean_text)
        if record["clean_choice"] != clean_choice:
            return dishonest(f"the clean answer's letter is {clean_choice!r}, not {record['clean_choice']!r}", rows)
    else:
        similarity, why_not = auditor_similarity(record["similarity"], hydra, tokenizer, similarity)
        if similarity is None:
            note += f"; the similarities were not recomputed ({why_not})"
            if any(a["similarity"] is None for a in attacks):
                return dishonest("a free-text attack records no similarity", rows)
            judged = [{"flipped": a["similarity"] <= FLIP_THRESHOLD, "similarity": a["similarity"]} for a in attacks]
        else:
            checks["similarity_checked"] = True
            judged = judge_attacks(clean_text, texts, False, similarity, question)
    for i, (attack, judgement) in enumerate(zip(attacks, judged, strict=True)):
        if not mcq and (
            attack["similarity"] is None or abs(attack["similarity"] - judgement["similarity"]) > MATRIX_TOLERANCE
        ):
            return dishonest(
                f"attack {i}: its similarity is {judgement['similarity']} under {record['similarity']}, "
                f"not {attack['similarity']}",
                rows,
            )
        if mcq and attack.get("choice") != judgement["choice"]:
            letter = f"{judgement['choice']!r}, not {attack.get('choice')!r}"
            return dishonest(f"attack {i}: its answer's letter is {letter}", rows)
        if attack["flipped"] != judgement["flipped"]:
            return dishonest(f"attack {i}: the flip rule says flipped={judgement['flipped']}", rows)
    flips = sum(j["flipped"] for j in judged)
    if record["flips"] != flips or record["flipped"] != flips:
        claimed = f"{record['flips']} ({record['flipped']})"
        return dishonest(f"{flips} of the attacks flipped the answer, not {claimed}", rows)
    value = 1.0 - flips / len(attacks)
    if abs(value - record["value"]) > VALUE_TOLERANCE:
        return dishonest(f"the robustness is {value:.9g} for {flips} flips of {len(attacks)}, not {record['value']}")
    return RobustnessAudit(
        True, f"{len(attacks)} attacked answers replayed, {flips} flipped, value {value:.3f} follows{note}", **checks,
        attacks=rows,
    )  # fmt: skip
