"""``olmo-tap train default-jury``: rebuild the jury the embedded default ships, from the base model and data that
ship with the package.

The embedded default (``smollm2-135m-instruct``) is SmolLM2-135M-Instruct split into a trunk of 27 layers and 5
text heads of 3 layers, plus an uncertainty head. Each text head carries its own LoRA, trained on its own
disjoint shard (``olmo_tap.train.lora_heads``) of:

- the training half of the short-answer facts (``olmo_tap.train.facts``: capitals, chemical symbols, opposites,
  weekdays and months, unit conversions, arithmetic), answered by one right sentence;
- generated multiple-choice questions (``olmo_tap.train.mcq``) with the right letter;
- the base model's own answers to the shipped prompt set (``olmo_tap.train.instructions``), which keep each head's
  everyday answers close to the base model's. They ship as ``answers.jsonl`` beside the adapters (the command
  regenerates them with ``--regenerate-answers``).

The uncertainty head then learns p(correct) for the trained jury's multiple-choice answers
(``olmo_tap.train.uncertainty``), starting from a copy of text head 0 with its LoRA merged: generated questions
and the training facts as multiple choice (``olmo_tap.train.facts.fact_mcqs``).

The adapters are written in PEFT's layout (``head0`` ... ``head4``, ``uncertainty``) with ``jury.json``; the
package's copy is ``olmo_tap/weights/default_jury``. Reproducible bit for bit: every random choice of the training
is seeded, and the command runs in one thread with AVX2 kernels (``REPRODUCIBLE_ENV``: torch's CPU kernels,
MKL's conditional numerical reproducibility and oneDNN all pinned to AVX2, and the cached attention and the norms
on torch's routes, not the native kernels compiled for the CPU at hand), so that any x86-64 CPU with AVX2 gives the
same bits whatever its vector width or core count; it re-starts itself in that environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from olmo_tap.hydra import HydraTransformer
from olmo_tap.train.data import ChatExample, shard_examples
from olmo_tap.train.facts import Fact, fact_mcqs, split_facts
from olmo_tap.train.mcq import MCQ, generate_mcqs, mcq_example
from olmo_tap.train.trainer import TrainConfig

JURY_RESOURCE = "default_jury"  # inside the olmo_tap.weights package
BASE_PRESET = "smollm2-135m-instruct-clones"
N_TEXT_HEADS = 5
HEADS_DEPTH = 3
UNCERTAINTY_INIT_FROM = 0
ANSWERS_FILE = "answers.jsonl"
ANSWER_SUFFIX = " Answer in one or two sentences."
ANSWER_TOKENS = 64
# Chosen by the settings sweep (python -m olmo_tap.benchmarks.jury_sweep, results/signals/sweep/sweep.md): the
# largest margin of the jury's best signal over one head's on the validation facts, with the jury's accuracy at
# least one head's. See jury.json for the run.
HEADS_CONFIG = TrainConfig(rank=8, alpha=16.0, lr=1e-3, epochs=3, batch_size=8, seed=0)
UNCERTAINTY_CONFIG = TrainConfig(rank=8, alpha=16.0, lr=1e-3, epochs=3, batch_size=16, seed=0)
MCQ_TRAIN = (400, 11)  # (questions, seed) for the text heads
MCQ_UNCERTAINTY = (600, 12)  # for the uncertainty head (a quarter held out for its calibration)
# ... with the training facts as multiple choice, once per seed (other distractors, other positions)
FACT_MCQ_SEEDS = (1, 3, 4, 5)
REPRODUCIBLE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # the model's own answers in the data are decoded: on torch's attention, whose kernels the lines above pin
    "OLMO_TAP_ATTENTION": "torch",
    # ... and on torch's norms (the shipped files were built before the native norm existed)
    "OLMO_TAP_NORM": "torch",
}


def jury_dir() -> Path:
    """The shipped adapters' directory inside the installed package."""
    return Path(str(resources.files("olmo_tap.weights").joinpath(JURY_RESOURCE)))


def in_reproducible_env() -> bool:
    return all(os.environ.get(k) == v for k, v in REPRODUCIBLE_ENV.items())


def shipped_answers(path: Path | None = None) -> list[dict[str, str]]:
    path = path or jury_dir() / ANSWERS_FILE
    if not path.is_file():
        rebuild = "olmo-tap train default-jury --regenerate-answers"
        raise FileNotFoundError(f"{path} is missing: rebuild it with `{rebuild}`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def jury_examples(
    answers: Sequence[dict[str, str]], facts: Sequence[Fact] | None = None, mcq: bool = True
) -> list[ChatExample]:
    """Every text head's training data, before sharding: facts (by default the training half), multiple choice,
    the model's own answers."""
    examples = [f.example() for f in (split_facts()[0] if facts is None else facts)]
    if mcq:
        examples += [mcq_example(q) for q in generate_mcqs(*MCQ_TRAIN)]
    examples += [ChatExample.from_prompt(a["prompt"], a["response"], source="own-answer") for a in answers]
    return examples


def uncertainty_questions() -> list[MCQ]:
    """The uncertainty head's questions: generated ones (arithmetic, comparisons, dates, units) and the training
    facts as multiple choice (questions the model may know)."""
    train_facts, _ = split_facts()
    return generate_mcqs(*MCQ_UNCERTAINTY) + [q for seed in FACT_MCQ_SEEDS for q in fact_mcqs(train_facts, seed)]


def data_digest(examples: Sequence[ChatExample]) -> str:
    return hashlib.sha256("".join(e.key for e in examples).encode()).hexdigest()


def regenerate_answers(model: HydraTransformer, tokenizer: Any, path: Path, progress: bool = True) -> dict[str, int]:
    """The base model's greedy answers (head 0 of the clones) to the shipped prompt set, written to ``path``."""
    from olmo_tap.jsonl import write_jsonl
    from olmo_tap.train.instructions import generate_instructions, load_prompt_set

    prompts = [p + ANSWER_SUFFIX for p in load_prompt_set()]
    examples, summary = generate_instructions(model, tokenizer, prompts, ANSWER_TOKENS, head=0, progress=progress)
    write_jsonl(path, examples)
    return summary


def train_default_jury(
    out: str | Path,
    *,
    heads: Sequence[int] | None = None,
    uncertainty: bool = True,
    regenerate: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the default jury's adapters into ``out`` (resumable: finished heads are reused).

    ``heads``: only these text heads (a partial rebuild, e.g. to check one shipped adapter; no uncertainty head,
    which needs the whole jury). ``regenerate``: answer the prompt set again instead of the shipped answers.
    """
    from olmo_tap.train.lora_heads import prepare_output, train_or_reuse
    from olmo_tap.train.uncertainty import train_uncertainty
    from olmo_tap.weights.lora import merge_lora
    from olmo_tap.weights.tokenizer import load_tokenizer

    started = time.perf_counter()
    out = Path(out)
    work = prepare_output(out)
    model = HydraTransformer.from_pretrained(BASE_PRESET, dtype="float32", device="cpu", progress=progress)
    tokenizer = load_tokenizer(BASE_PRESET)
    answers_path = out / ANSWERS_FILE
    if regenerate:
        answer_summary = regenerate_answers(model, tokenizer, answers_path, progress)
    else:
        shutil.copyfile(jury_dir() / ANSWERS_FILE, answers_path)
        answer_summary = None
    examples = jury_examples(shipped_answers(answers_path))
    shards = shard_examples(examples, N_TEXT_HEADS)
    wanted = list(range(N_TEXT_HEADS)) if heads is None else sorted(set(heads))
    if any(not 0 <= h < N_TEXT_HEADS for h in wanted):
        raise ValueError(f"heads must be in 0..{N_TEXT_HEADS - 1}, got {list(heads or [])}")
    head_stats = []
    for head in wanted:
        adapter, stats = train_or_reuse(
            model, tokenizer, head, shards[head], HEADS_CONFIG, work, f"head{head}", base_name=BASE_PRESET,
            progress=progress,
        )  # fmt: skip
        adapter.save(out / f"head{head}", BASE_PRESET)
        merge_lora(model, head, adapter.to_lora_adapter())
        head_stats.append(stats)
    report: dict[str, Any] = {
        "base_model": BASE_PRESET,
        "n_text_heads": N_TEXT_HEADS,
        "heads_depth": HEADS_DEPTH,
        "uncertainty_init_from": UNCERTAINTY_INIT_FROM,
        "data": {
            "examples": len(examples),
            "digest": data_digest(examples),
            "shard_sizes": [len(s) for s in shards],
            "by_source": _count_sources(examples),
            "own_answers": answer_summary,
        },
        "heads_config": HEADS_CONFIG.to_dict(),
        "heads": head_stats,
        "environment": {k: os.environ.get(k) for k in REPRODUCIBLE_ENV},
    }
    if uncertainty and heads is None:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            unc = train_uncertainty(
                model, tokenizer, uncertainty_questions(), UNCERTAINTY_CONFIG, Path(tmp) / "jury",
                init_from=UNCERTAINTY_INIT_FROM, base_name=BASE_PRESET, progress=progress,
            )  # fmt: skip
            shutil.copytree(Path(tmp) / "jury" / "adapters" / "uncertainty", out / "uncertainty", dirs_exist_ok=True)
        report["uncertainty"] = {k: unc[k] for k in ("questions", "answers", "config", "train_loss")} | {
            "calibration_before": _summary(unc["calibration_before"]),
            "calibration_after": _summary(unc["calibration_after"]),
        }
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    (out / "jury.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return report


def _count_sources(examples: Sequence[ChatExample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in examples:
        kind = e.source.split(":")[0] or "other"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _summary(calibration: dict[str, Any]) -> dict[str, Any]:
    return {k: calibration[k] for k in ("n", "ece", "brier", "auroc", "accuracy") if k in calibration}


def run_reproducibly(argv: Sequence[str]) -> int:
    """Run ``olmo-tap <argv>`` in a fresh interpreter under ``REPRODUCIBLE_ENV`` (the settings must be in place
    before torch loads); returns its exit status."""
    env = {**os.environ, **REPRODUCIBLE_ENV}
    code = "import sys; from olmo_tap.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.call([sys.executable, "-c", code, *argv], env=env)
