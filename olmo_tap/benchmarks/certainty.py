"""``olmo-tap experiment certainty``: which similarity makes Kernel Language Entropy worth reading.

On the held-out short-answer questions of ``olmo-tap experiment signals`` (``olmo_tap.train.facts``, the half
never trained on), the jury answers each greedily (PoE, veto 1e-3, as that experiment does) and samples
``N_SAMPLES`` more answers at ``SAMPLE_TEMPERATURE`` with the seeds the service would derive (all batched with
``PoE.generate_many``). For every similarity (``olmo_tap.certainty.similarity``) the same samples give a KLE
certainty per question; its worth is the AUROC of ``1 - certainty`` for the wrong answers (95% bootstrap
interval), and its cost the time per answer (sampling, then the similarity). The samples are saved
(``samples.json``), so a rerun with ``--reuse`` only recomputes the similarities.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from olmo_tap.benchmarks.signals import bootstrap_auroc
from olmo_tap.certainty.kle import N_SAMPLES, kernel_language_entropy, kle_certainty
from olmo_tap.certainty.sampled import SAMPLE_TEMPERATURE, sample_seeds, sample_settings
from olmo_tap.certainty.similarity import SIMILARITIES, make_similarity, similarity_matrix
from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.train.calibration import score_auroc
from olmo_tap.train.facts import is_correct, split_facts
from olmo_tap.weights.presets import DEFAULT_MODEL
from olmo_tap.weights.tokenizer import load_tokenizer

BATCH = 8


def run_certainty(
    out: str | Path = "results/certainty",
    *,
    model: str = DEFAULT_MODEL,
    n_questions: int | None = None,
    similarities: tuple[str, ...] = tuple(SIMILARITIES),
    max_new_tokens: int = 24,
    veto: float = 1e-3,
    reuse: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    jury = HydraTransformer.from_pretrained(model, dtype="float32", device="cpu", progress=progress)
    _, facts = split_facts()
    facts = facts[:n_questions] if n_questions else facts
    cached = out / "samples.json"
    if reuse and cached.is_file():
        data = json.loads(cached.read_text())
    else:
        data = _sample(jury, tokenizer, facts, max_new_tokens, veto, progress)
        cached.write_text(json.dumps(data) + "\n")
    wrong = np.array([not is_correct(f, a) for f, a in zip(facts, data["answers"], strict=True)])
    results: dict[str, Any] = {
        "model": model,
        "questions": len(facts),
        "n_samples": N_SAMPLES,
        "temperature": SAMPLE_TEMPERATURE,
        "accuracy": float(1 - wrong.mean()),
        "sampling_s_per_answer": data["sampling_s"] / len(facts),
        "answer_s_per_answer": data["answer_s"] / len(facts),
        "similarities": {},
    }
    rng = np.random.default_rng(0)
    for name in similarities:
        similarity = make_similarity(name, jury, tokenizer)
        certainties, started = [], time.perf_counter()
        for fact, samples in tqdm(
            list(zip(facts, data["samples"], strict=True)), desc=name, unit="q", disable=not progress
        ):
            matrix = similarity_matrix(similarity, samples, fact.question)
            certainties.append(kle_certainty(kernel_language_entropy(matrix), len(samples)))
        seconds = (time.perf_counter() - started) / len(facts)
        suspicion = 1.0 - np.array(certainties)
        low, high = bootstrap_auroc(suspicion, wrong, rng)
        results["similarities"][name] = {
            "auroc": score_auroc(suspicion, wrong),
            "ci95": [low, high],
            "mean_certainty_right": _mean([c for c, w in zip(certainties, wrong, strict=True) if not w]),
            "mean_certainty_wrong": _mean([c for c, w in zip(certainties, wrong, strict=True) if w]),
            "similarity_s_per_answer": seconds,
            "certainties": certainties,
        }
    from olmo_tap.verify.experiment import machine

    results["machine"] = machine()
    (out / "kle.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "kle.md").write_text(markdown(results))
    return results


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _sample(jury: Any, tokenizer: Any, facts: list[Any], max_new_tokens: int, veto: float, progress: bool) -> dict:
    settings = DecodeSettings(veto_threshold=veto, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    answerer = PoE.from_settings(jury, tokenizer, settings)
    sampler = PoE.from_settings(jury, tokenizer, sample_settings(settings))
    answers, samples = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(facts), BATCH), desc="answers", unit="batch", disable=not progress):
        chunk = facts[start : start + BATCH]
        outputs = answerer.generate_many([f.prompt for f in chunk], max_batch=BATCH, seeds=[0] * len(chunk))
        answers += [o.text for o in outputs]
    answer_s = time.perf_counter() - started
    started = time.perf_counter()
    for i, fact in enumerate(tqdm(facts, desc="KLE samples", unit="q", disable=not progress)):
        # The answer's seed is its index: each question's samples get their own derived seeds.
        outputs = sampler.generate_many([fact.prompt] * N_SAMPLES, max_batch=N_SAMPLES, seeds=sample_seeds(i))
        samples.append([o.text for o in outputs])
    return {"answers": answers, "samples": samples, "answer_s": answer_s, "sampling_s": time.perf_counter() - started}


def markdown(results: dict[str, Any]) -> str:
    from olmo_tap.verify.experiment import machine_line

    lines = [
        "# Kernel Language Entropy: which similarity (olmo-tap experiment certainty)",
        "",
        f"{results['questions']} held-out short-answer questions, model `{results['model']}`; the jury's greedy "
        f"answer is right for {results['accuracy']:.1%}. Each question: {results['n_samples']} sampled answers at "
        f"temperature {results['temperature']:g}, batched: {results['sampling_s_per_answer']:.2f} s per question "
        f"(the greedy answer itself: {results['answer_s_per_answer']:.2f} s in batches of {BATCH}).",
        "",
        f"Machine: {machine_line(results['machine'])}",
        "",
        "| similarity | AUROC (wrong answers) | 95% CI | mean certainty right / wrong | similarity s / answer |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["similarities"].items():
        low, high = row["ci95"]
        ci = "n/a" if low is None else f"[{low:.3f}, {high:.3f}]"
        auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
        lines.append(
            f"| {name} | {auroc} | {ci} | {_fmt(row['mean_certainty_right'])} / {_fmt(row['mean_certainty_wrong'])} "
            f"| {row['similarity_s_per_answer']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def measure_cost(
    out: str | Path = "results/certainty",
    *,
    model: str = DEFAULT_MODEL,
    n_questions: int = 20,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """What KLE costs per answer on this machine, measured alone: the jury's answer (greedy, streamed as the CLI
    does), then its ``N_SAMPLES`` samples in one batch, then each similarity; seconds per answer, means over the
    first ``n_questions`` held-out questions (one warm-up answer first)."""
    import torch

    tokenizer = load_tokenizer(model)
    jury = HydraTransformer.from_pretrained(model, dtype="float32", device="cpu", progress=False)
    facts = split_facts()[1][:n_questions]
    settings = DecodeSettings(veto_threshold=1e-3, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    answerer = PoE.from_settings(jury, tokenizer, settings)
    sampler = PoE.from_settings(jury, tokenizer, sample_settings(settings))
    similarities = {name: make_similarity(name, jury, tokenizer) for name in SIMILARITIES}
    answerer.generate_with_cache(facts[0].prompt)  # warm-up
    times: dict[str, list[float]] = {"answer": [], "samples": [], **{name: [] for name in similarities}}
    tokens = {"answer": 0, "samples": 0}
    for i, fact in enumerate(facts):
        started = time.perf_counter()
        output = answerer.generate_with_cache(fact.prompt)
        times["answer"].append(time.perf_counter() - started)
        tokens["answer"] += len(output.token_ids)
        started = time.perf_counter()
        samples = sampler.generate_many([fact.prompt] * N_SAMPLES, max_batch=N_SAMPLES, seeds=sample_seeds(i))
        times["samples"].append(time.perf_counter() - started)
        tokens["samples"] += sum(len(s.token_ids) for s in samples)
        for name, similarity in similarities.items():
            started = time.perf_counter()
            similarity_matrix(similarity, [s.text for s in samples], fact.question)
            times[name].append(time.perf_counter() - started)
    from olmo_tap.verify.experiment import machine

    results = {
        "model": model,
        "questions": len(facts),
        "threads": torch.get_num_threads(),
        "seconds_per_answer": {k: float(np.mean(v)) for k, v in times.items()},
        "tokens_per_answer": {k: v / len(facts) for k, v in tokens.items()},
        "machine": machine(),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="KLE's cost per answer on this machine (results/certainty/cost.json)")
    parser.add_argument("--out", default="results/certainty")
    parser.add_argument("--questions", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(measure_cost(args.out, n_questions=args.questions), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
