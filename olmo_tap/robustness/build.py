"""``olmo-tap train attacks``: build an attack bank with GCG against a model, resumably, with a progress bar.

Entry i optimises one suffix on its own ``questions_per_suffix`` training questions: generated multiple-choice
questions (``olmo_tap.train.mcq``, seed ``TRAIN_QUESTIONS_SEED``; the held-out questions of the experiments use
other seeds and leave out any question seen here). Its seed is ``derived_seed(settings.seed, i)``. After each
entry the bank is written (atomically), so an interrupted build resumes at the next entry; a bank made with
other settings or for other weights is refused rather than mixed.

Success at creation is measured by decoding, not by the letter scores GCG optimises: the target's decoder
(greedy; the jury: PoE over every text head, no veto; a head: that head alone) answers each training question
with and without the suffix, and a flip is a different option letter (``parse_choice``; no letter counts as an
answer of its own). The bank keeps its entries best first (``BankEntry.rank_key``): the probe takes the first k.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from olmo_tap.hydra import HydraTransformer
from olmo_tap.robustness.bank import AttackBank, BankEntry, BankError, load_bank, model_fingerprint
from olmo_tap.robustness.gcg import Attack, attacked_text, question_digest
from olmo_tap.robustness.measure import answer_letters, flips, target_settings
from olmo_tap.robustness.settings import GCGSettings
from olmo_tap.train.mcq import MCQ, format_mcq, generate_mcqs
from olmo_tap.train.trainer import derived_seed

TRAIN_QUESTIONS_SEED = 4021


def training_questions(n_entries: int, per_entry: int) -> list[list[MCQ]]:
    questions = generate_mcqs(n_entries * per_entry, seed=TRAIN_QUESTIONS_SEED)
    return [questions[i * per_entry : (i + 1) * per_entry] for i in range(n_entries)]


def _resume(out: Path, name: str, fingerprint: str, settings: GCGSettings) -> AttackBank:
    if not out.exists():
        return AttackBank(name, fingerprint, settings.to_dict())
    try:
        bank = load_bank(out)
    except BankError as e:
        raise BankError(f"{out} exists and is not a bank this command can resume ({e}); choose another --out") from e
    if bank.fingerprint != fingerprint or bank.settings != settings.to_dict():
        raise BankError(
            f"{out} was built for other weights or with other settings ({bank.settings}); "
            "choose another --out to build a new bank"
        )
    return bank


def build_bank(
    model: HydraTransformer,
    tokenizer: Any,
    out: str | Path,
    *,
    model_name: str,
    n_entries: int,
    settings: GCGSettings,
    progress: bool = True,
) -> AttackBank:
    """Build (or resume) a bank of ``n_entries`` suffixes at ``out``; returns it."""
    from tqdm.auto import tqdm

    if n_entries < 1:
        raise ValueError(f"a bank needs at least 1 entry, got {n_entries}")
    out = Path(out)
    bank = _resume(out, model_name, model_fingerprint(model), settings)
    groups = training_questions(n_entries, settings.questions_per_suffix)
    done = {tuple(e.questions) for e in bank.entries}
    attack = Attack(model, tokenizer, settings)
    decode = target_settings(settings.target)
    with tqdm(total=n_entries, desc="GCG suffixes", unit="suffix", disable=not progress) as bar:
        for i, questions in enumerate(groups):
            digests = [question_digest(q) for q in questions]
            if tuple(digests) in done:
                bar.update(1)
                continue
            start = time.perf_counter()
            entry_seed = derived_seed(settings.seed, i)

            def step(s: int, loss: float, flipped: int) -> None:
                bar.set_postfix(step=f"{s + 1}/{settings.steps}", loss=f"{loss:.2f}", flipped=flipped)

            found = attack.run(questions, entry_seed, on_step=step)
            texts = [format_mcq(q) for q in questions]
            clean = answer_letters(model, tokenizer, decode, texts)
            attacked = answer_letters(model, tokenizer, decode, [attacked_text(t, found["suffix"]) for t in texts])
            bank.entries.append(
                BankEntry(
                    index=i,
                    suffix=found["suffix"],
                    token_ids=found["token_ids"],
                    target=settings.target,
                    questions=digests,
                    flipped=flips(clean, attacked),
                    n_questions=len(questions),
                    loss=round(found["loss"], 6),
                    steps=found["steps"],
                    seconds=round(time.perf_counter() - start, 1),
                    seed=entry_seed,
                    trace=found["trace"],
                )
            )
            bank.entries.sort(key=BankEntry.rank_key)
            bank.save(out)
            bar.update(1)
    return bank


def rerun_entry(model: HydraTransformer, tokenizer: Any, bank: AttackBank, entry: BankEntry, steps: int) -> list:
    """The first ``steps`` suffixes of ``entry``'s GCG run, recomputed with the bank's settings: equal to the
    entry's ``trace`` prefix when the bank came from this code on these weights (under the same arithmetic)."""
    settings = GCGSettings(**bank.settings)
    questions = training_questions(entry.index + 1, settings.questions_per_suffix)[entry.index]
    if [question_digest(q) for q in questions] != entry.questions:
        raise BankError(f"entry {entry.index}: its questions are not the ones this code trains entry {entry.index} on")
    return Attack(model, tokenizer, settings).run(questions, entry.seed, steps=steps)["trace"]
