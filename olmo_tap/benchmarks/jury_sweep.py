"""``python -m olmo_tap.benchmarks.jury_sweep``: choose the default jury's training settings by measurement.

Each configuration trains the five text heads of ``olmo-tap train default-jury`` (same base, same data sources,
same sharding) with one setting changed, on the training facts *minus a validation third*, and answers that third
with one head alone and with the jury (PoE, veto 1e-3), as ``olmo-tap experiment signals`` does on the held-out
half. The score of a configuration is what section 3 of the signals experiment asks of the jury: its accuracy
(not below the single head's) and the AUROC of its best signal against the single head's best. The held-out half
stays untouched for the final measurement of the chosen configuration.

The validation third is drawn by a hash of the question text with its own salt, so it is the same for every
configuration; it is small (about 100 questions), so every AUROC is given with its bootstrap interval.

    python -m olmo_tap.benchmarks.jury_sweep --configs shipped,lr1e-3 --out results/signals/sweep
    python -m olmo_tap.benchmarks.jury_sweep --report results/signals/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from olmo_tap.benchmarks.signals import Answer, answer, best_signal, margin_interval, signal_table
from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE
from olmo_tap.train.data import ChatExample, shard_examples
from olmo_tap.train.default_jury import (
    BASE_PRESET,
    HEADS_DEPTH,
    N_TEXT_HEADS,
    jury_examples,
    shipped_answers,
)
from olmo_tap.train.facts import Fact, is_correct, split_facts
from olmo_tap.train.trainer import TrainConfig
from olmo_tap.weights.tokenizer import load_tokenizer

VALIDATION_PERCENT = 33
VETO = 1e-3
MAX_NEW_TOKENS = 24
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# Where the sweep started: the settings of the first shipped jury (every variant changes one thing from it).
START = TrainConfig(rank=8, alpha=16.0, lr=2e-3, epochs=3, batch_size=8, seed=0)


@dataclasses.dataclass(frozen=True)
class Variant:
    config: TrainConfig = START
    heads_depth: int = HEADS_DEPTH
    mcq: bool = True
    own_answers: bool = True
    note: str = ""


def _with(note: str, **changes: Any) -> Variant:
    config = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    rest = {k: v for k, v in changes.items() if k not in config}
    return Variant(dataclasses.replace(START, **config), note=note, **rest)


VARIANTS: dict[str, Variant | None] = {
    "base": None,  # the model as released, no training: the floor
    "start": _with("the first shipped settings: rank 8, lr 2e-3, 3 epochs, feed-forward linears"),
    "lr1e-3": _with("learning rate 1e-3", lr=1e-3),
    "lr4e-3": _with("learning rate 4e-3", lr=4e-3),
    "lr5e-4": _with("learning rate 5e-4", lr=5e-4),
    "lr1e-3-epochs2": _with("learning rate 1e-3, 2 epochs", lr=1e-3, epochs=2),
    "epochs5": _with("5 epochs", epochs=5),
    "rank16": _with("rank 16 (alpha 32)", rank=16, alpha=32.0),
    "rank4": _with("rank 4 (alpha 8)", rank=4, alpha=8.0),
    "attention": _with("LoRA on the attention linears too", target_modules=(*START.target_modules, *ATTENTION)),
    "no-mcq": _with("without the multiple-choice examples", mcq=False),
    "depth6": _with("heads 6 layers deep (trunk 24)", heads_depth=6),
}


def validation_split() -> tuple[list[Fact], list[Fact]]:
    """(fit, validation): the training facts split by a salted hash of the question."""
    train, _ = split_facts()

    def held(f: Fact) -> bool:
        digest = hashlib.sha256(f"validation|{f.question}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT

    return [f for f in train if not held(f)], [f for f in train if held(f)]


def examples_for(variant: Variant, fit: list[Fact]) -> list[ChatExample]:
    return jury_examples(shipped_answers() if variant.own_answers else [], fit, mcq=variant.mcq)


def train_heads(variant: Variant, fit: list[Fact], tokenizer: Any, progress: bool) -> tuple[HydraTransformer, list]:
    from olmo_tap.train.lora_heads import train_head_on_examples
    from olmo_tap.weights.lora import merge_lora

    model = HydraTransformer.from_pretrained(
        BASE_PRESET, n_heads=N_TEXT_HEADS, heads_depth=variant.heads_depth, dtype="float32", device="cpu",
        progress=progress,
    )  # fmt: skip
    shards = shard_examples(examples_for(variant, fit), N_TEXT_HEADS)
    stats = []
    for head in range(N_TEXT_HEADS):
        result, head_stats = train_head_on_examples(
            model, tokenizer, head, shards[head], variant.config, progress=progress
        )
        merge_lora(model, head, result.adapter.to_lora_adapter())
        stats.append(head_stats)
    return model, stats


def _answers(decoder_for: Any, name: str, questions: list[Fact], progress: bool) -> list[Answer]:
    return [
        answer(decoder_for(i), f.prompt, name, f.question, lambda t, f=f: is_correct(f, t))
        for i, f in enumerate(tqdm(questions, desc=name, unit="q", disable=not progress))
    ]


def _record(answers: list[Answer]) -> list[dict[str, Any]]:
    return [{"question": a.question, "correct": a.correct, "signals": a.signals} for a in answers]


def _summary(answers: list[Answer]) -> dict[str, Any]:
    table = signal_table(answers)
    best = best_signal(table)
    return {
        "accuracy": sum(a.correct for a in answers) / len(answers),
        "best_signal": best,
        "auroc": table[best]["auroc"],
        "ci95": table[best]["ci95"],
        "signals": table,
        "answers": _record(answers),
    }


def run_variant(name: str, out: Path, progress: bool = True) -> dict[str, Any]:
    from olmo_tap.verify.experiment import machine

    started = time.perf_counter()
    tokenizer = load_tokenizer(BASE_PRESET)
    fit, validation = validation_split()
    variant = VARIANTS[name]
    common = dict(max_new_tokens=MAX_NEW_TOKENS, seed=0, top_logprobs=0)
    result: dict[str, Any] = {"name": name, "validation_questions": len(validation), "fit_facts": len(fit)}
    if variant is None:
        model = HydraTransformer.from_pretrained(BASE_PRESET, dtype="float32", device="cpu", progress=progress)
        single = PoE(model, tokenizer, mode="single", head=0, **common)
        result["single"] = _summary(_answers(lambda i: single, "base", validation, progress))
    else:
        model, stats = train_heads(variant, fit, tokenizer, progress)
        result |= {"note": variant.note, "config": variant.config.to_dict(), "heads_depth": variant.heads_depth,
                   "mcq": variant.mcq, "own_answers": variant.own_answers, "heads": stats}  # fmt: skip
        result["train_minutes"] = (time.perf_counter() - started) / 60
        heads = [PoE(model, tokenizer, mode="single", head=h, **common) for h in range(N_TEXT_HEADS)]
        jury = PoE(model, tokenizer, veto_threshold=VETO, **common)
        single_answers = _answers(lambda i: heads[i % N_TEXT_HEADS], "single", validation, progress)
        jury_answers = _answers(lambda i: jury, "jury", validation, progress)
        result["single"], result["jury"] = _summary(single_answers), _summary(jury_answers)
        result["margin"] = result["jury"]["auroc"] - result["single"]["auroc"]
        result["margin_ci95"] = list(
            margin_interval(
                jury_answers, result["jury"]["best_signal"], single_answers, result["single"]["best_signal"]
            )
        )
    result["minutes"] = (time.perf_counter() - started) / 60
    result["machine"] = machine()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _interval(ci: list[float | None] | None) -> str:
    return f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci and None not in ci else ""


def report(out: Path) -> str:
    from olmo_tap.verify.experiment import machine, machine_line

    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    fmt = lambda s: f"{s['auroc']:.3f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"  # noqa: E731
    n = next(iter(rows.values()))["validation_questions"] if rows else 0
    lines = [
        f"Training settings of the default jury, each scored on {n} validation questions (a third of the training "
        "facts, left out of that configuration's training); greedy, up to 24 new tokens, jury = PoE with veto 1e-3. "
        "AUROC of the best signal for detecting a wrong answer, 95% bootstrap interval in brackets; margin = jury - "
        "single (paired bootstrap 95% interval where the answers were kept). One setting changed at a time from the "
        "first shipped settings (start).",
        "",
        "| configuration | single acc. | jury acc. | single best (AUROC) | jury best (AUROC) | margin | train min |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for name in VARIANTS:
        r = rows.get(name)
        if r is None:
            continue
        s = r["single"]
        if "jury" not in r:
            cells = f"{s['accuracy']:.1%} | - | {s['best_signal']}: {fmt(s)} | - | - | -"
            lines.append(f"| {name} (no training) | {cells} |")
            continue
        j = r["jury"]
        lines.append(
            f"| {name}: {r['note']} | {s['accuracy']:.1%} | {j['accuracy']:.1%} | {s['best_signal']}: {fmt(s)} | "
            f"{j['best_signal']}: {fmt(j)} | {r['margin']:+.3f}{_interval(r.get('margin_ci95'))} | "
            f"{r['train_minutes']:.0f} |"
        )
    machines = {machine_line(r["machine"]) for r in rows.values() if "machine" in r}
    lines += ["", f"Machine: {'; '.join(sorted(machines)) or machine_line(machine())}."]
    text = "\n".join(lines) + "\n"
    (out / "sweep.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("results/signals/sweep"))
    parser.add_argument("--report", type=Path, help="only write sweep.md from the results in this directory")
    args = parser.parse_args(argv)
    if args.report:
        if not any(args.report.glob("*.json")):
            parser.error(f"--report {args.report}: no configuration results (*.json) there")
        print(report(args.report))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in VARIANTS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(VARIANTS)}")
    for name in names:
        if (args.out / f"{name}.json").is_file():
            print(f"{name}: done earlier, skipped")
            continue
        r = run_variant(name, args.out)
        print(json.dumps({k: r[k] for k in ("name", "minutes", "margin") if k in r}))
    print(report(args.out))


if __name__ == "__main__":
    main()
