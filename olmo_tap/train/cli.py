"""Sub-commands ``olmo-tap train heads|uncertainty|robustness|mcq|instructions|...`` and ``olmo-tap experiment ...``.

Nothing heavy is imported at module level: the CLI builds its parser without torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from olmo_tap.cli import int_list, str_list


def add_training_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int) -> None:
    group = parser.add_argument_group("LoRA training")
    group.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    group.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r, as the original system)")
    group.add_argument(
        "--target-modules",
        type=str_list,
        default=["gate_proj", "up_proj", "down_proj"],
        help="linears to adapt, comma-separated, from q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
        "(default: the feed-forward ones)",
    )
    group.add_argument(
        "--target-layers",
        type=int_list,
        default=None,
        help="base-model layer indices to adapt, comma-separated (default: every head layer)",
    )
    group.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    group.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"examples per step (default {batch_size})")
    group.add_argument("--seed", type=int, default=0, help="seed of the adapters' init and the data order")
    group.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def training_config(args: argparse.Namespace) -> Any:
    from olmo_tap.train.trainer import TrainConfig

    return TrainConfig(
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        target_modules=tuple(args.target_modules),
        target_layers=tuple(args.target_layers) if args.target_layers is not None else None,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )


def _is_saved_ensemble(source: str) -> bool:
    from olmo_tap.weights.sources import resolve

    try:
        return resolve(source).kind == "ensemble_dir"
    except ValueError:
        return False


def cmd_train_heads(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from olmo_tap.train.data import read_chat_examples
    from olmo_tap.train.lora_heads import train_heads

    examples = read_chat_examples(args.data)  # bad data fails before the model loads
    config = training_config(args)
    if args.heads is None and args.shards is not None and not _is_saved_ensemble(args.model):
        args.heads = args.shards  # one head per shard
    model, tokenizer = load(args)
    report = train_heads(
        model, tokenizer, examples, config, args.out, n_shards=args.shards, base_name=args.model,
        progress=not args.no_progress,
    )  # fmt: skip
    for stats in report["heads"]:
        print(
            f"head {stats['head']}: {stats['examples']} examples, loss {stats['loss_before']:.4f} -> "
            f"{stats['loss_after']:.4f} in {stats['steps']} steps"
        )
    print(f"saved the ensemble to {args.out} ({report['elapsed_s']:.0f}s); use it with --model {args.out}")
    return 0


def cmd_train_uncertainty(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from olmo_tap.train.mcq import generate_mcqs, read_mcqs
    from olmo_tap.train.uncertainty import train_uncertainty

    questions = read_mcqs(args.data) if args.data else generate_mcqs(args.questions, seed=args.seed)
    config = training_config(args)
    model, tokenizer = load(args)
    report = train_uncertainty(
        model,
        tokenizer,
        questions,
        config,
        args.out,
        eval_fraction=args.eval_fraction,
        mode=args.mode,
        veto_threshold=args.veto,
        init_from=args.init_from,
        base_name=args.model,
        progress=not args.no_progress,
    )
    for name in ("calibration_before", "calibration_after"):
        c = report[name]
        auroc = "undefined" if c["auroc"] is None else f"{c['auroc']:.3f}"
        print(
            f"{name.replace('_', ' ')}: ECE {c['ece']:.3f}, Brier {c['brier']:.3f}, AUROC {auroc} "
            f"({c['n']} held-out answers, {c['accuracy']:.0%} correct)"
        )
    print(f"saved the ensemble with its uncertainty head to {args.out} (calibration.json, reliability.png)")
    return 0


def cmd_train_default_jury(args: argparse.Namespace) -> int:
    from olmo_tap.train import default_jury as dj

    if args.heads is not None and (not args.heads or any(not 0 <= h < dj.N_TEXT_HEADS for h in args.heads)):
        raise ValueError(f"--heads must list text heads in 0..{dj.N_TEXT_HEADS - 1}, got {args.heads}")
    if not dj.in_reproducible_env():
        print(f"training in a fresh process with reproducible arithmetic: {_env_line(dj.REPRODUCIBLE_ENV)}", flush=True)
        argv = ["train", "default-jury", "--out", args.out]
        argv += ["--heads", ",".join(map(str, args.heads))] if args.heads is not None else []
        argv += [flag for flag, on in (("--regenerate-answers", args.regenerate_answers), ("--compare", args.compare),
                                       ("--no-progress", args.no_progress)) if on]  # fmt: skip
        return dj.run_reproducibly(argv)
    report = dj.train_default_jury(
        args.out, heads=args.heads, regenerate=args.regenerate_answers, progress=not args.no_progress
    )
    data = report["data"]
    print(f"{data['examples']} examples {data['by_source']}, shards {data['shard_sizes']}")
    for stats in report["heads"]:
        print(
            f"head {stats['head']}: {stats['examples']} examples, loss {stats['loss_before']:.4f} -> "
            f"{stats['loss_after']:.4f} in {stats['steps']} steps"
        )
    if "uncertainty" in report:
        c = report["uncertainty"]["calibration_after"]
        print(f"uncertainty head: ECE {c['ece']:.3f}, Brier {c['brier']:.3f}, AUROC {c['auroc']} (held-out MCQ)")
    print(f"adapters written to {args.out} in {report['elapsed_s']:.0f}s")
    if args.compare:
        return 0 if _same_as_shipped(Path(args.out), dj.jury_dir()) else 1
    return 0


def cmd_train_attacks(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from olmo_tap.robustness.settings import GCGSettings
    from olmo_tap.train import default_jury as dj

    settings = GCGSettings(
        suffix_tokens=args.suffix_tokens,
        steps=args.steps,
        candidates=args.candidates,
        top_k=args.top_k,
        questions_per_suffix=args.questions_per_suffix,
        kappa=args.kappa,
        target=args.target,
        seed=args.seed,
    )  # fmt: skip  (validated here, before a model loads or a process starts)
    if args.entries < 1:
        raise ValueError(f"--entries must be a positive integer, got {args.entries}")
    if not dj.in_reproducible_env() and not args.any_arithmetic:
        print(f"attacking in a fresh process, reproducible arithmetic: {_env_line(dj.REPRODUCIBLE_ENV)}", flush=True)
        argv = ["train", "attacks", "--out", args.out, "--entries", str(args.entries), "--model", args.model]
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in settings.to_dict().items()]
        argv += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("heads", "heads_depth", "dtype", "device")
                 if getattr(args, k) is not None]  # fmt: skip
        return dj.run_reproducibly(argv + (["--no-progress"] if args.no_progress else []))
    from olmo_tap.robustness.build import build_bank

    model, tokenizer = load(args)
    bank = build_bank(
        model, tokenizer, args.out, model_name=args.model, n_entries=args.entries, settings=settings,
        progress=not args.no_progress,
    )  # fmt: skip
    total = sum(e.seconds for e in bank.entries)
    for e in bank.entries:
        print(f"{e.flipped}/{e.n_questions} flipped ({e.steps} steps, {e.seconds:.0f}s): {e.suffix!r}")
    print(f"{len(bank.entries)} suffixes in {args.out} ({total:.0f}s of GCG and measurement)")
    return 0


def _bank_for(path: str | None, model: str) -> Any:
    """The bank at ``path``, else the one shipped for ``model``; a clear error when there is none."""
    from olmo_tap.robustness.probe import resolve_bank

    bank = resolve_bank(path, model)
    if bank is None:
        raise ValueError(f"no attack bank ships for {model!r}: give --bank (build one with `olmo-tap train attacks`)")
    return bank


def cmd_train_robustness(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from olmo_tap.train import robustness as rt
    from olmo_tap.train.default_jury import MCQ_TRAIN
    from olmo_tap.train.mcq import generate_mcqs, read_mcqs

    bank = _bank_for(args.bank, args.model)
    where = args.bank or f"the bank shipped for {args.model}"
    hold_out = rt.HOLD_OUT_EVERY if args.hold_out_every is None else args.hold_out_every
    rt.split_suffixes(bank, hold_out, where)  # a bank with nothing to train on fails before the model loads
    n = MCQ_TRAIN[0] if args.questions is None else args.questions
    seed = MCQ_TRAIN[1] if args.question_seed is None else args.question_seed
    if n < 1:
        raise ValueError(f"--questions must be a positive integer, got {n}")
    questions = read_mcqs(args.data) if args.data else generate_mcqs(n, seed=seed)
    config = training_config(args)
    model, tokenizer = load(args)
    report = rt.train_robustness(
        model, tokenizer, bank, questions, config, args.out, heads=args.only_heads, hold_out_every=hold_out,
        patience=rt.PATIENCE if args.patience is None else args.patience, base_name=args.model, bank_path=where,
        progress=not args.no_progress,
    )  # fmt: skip
    s = report["suffixes"]
    print(f"{len(s['trained'])} suffixes trained, {len(s['held_out'])} held out ({s['rule']})")
    for h in report["heads"]:
        print(
            f"head {h['head']}: {h['flipped_before']} -> {h['flipped_after']} of {h['pairs']} pairs flipped, "
            f"loss {h['loss_before']:.4f} -> {h['loss_after']:.4f} in {h['steps']} steps ({h['seconds']:.0f}s)"
        )
    print(f"adapters written to {args.out}/head<h>; stack them on the heads' own with load_ensemble")
    return 0


def cmd_robustness_training(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.robustness_training import markdown, run_robustness_training

    for name in ("questions", "train_questions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    report = run_robustness_training(
        args.out, adapters=args.adapters, bank_path=args.bank, n_questions=args.questions,
        n_train_questions=args.train_questions, config=training_config(args), progress=not args.no_progress,
    )  # fmt: skip
    print(markdown(report))
    print(f"written to {args.out}/training.json, training.md (adapters in {args.adapters})")
    return 0


def _env_line(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items())


def _same_as_shipped(out: Path, shipped: Path) -> bool:
    """Every adapter file written to ``out`` against the package's, byte for byte (printed per file).

    Where a head's file differs, its loss before training (recorded to full precision in both ``jury.json``) says
    why: equal, the code or data changed (a real difference); unequal on the same data, this CPU's pinned
    arithmetic rounds differently from the builder's (the pinning fixes the instruction set, not every library's
    blocking: seen on an Intel Xeon against the AMD EPYC that built the files), so bytes cannot match here, and
    the rebuild is held to the shipped run instead: same data, same steps, the loss after training within 1e-4
    and every adapter weight within 1% of the largest of its tensor. True when every file is identical, or
    differs only so."""
    import json

    from safetensors.torch import load_file

    same = True
    mine, theirs = (json.loads((d / "jury.json").read_text()) for d in (out, shipped))
    heads = {h["head"]: h for h in theirs["heads"]}
    for path in sorted(out.glob("*/adapter_*")):
        twin = shipped / path.relative_to(out)
        equal = twin.is_file() and twin.read_bytes() == path.read_bytes()
        print(f"{path.relative_to(out)}: {'identical to' if equal else 'DIFFERS from'} the shipped file")
        name = path.parent.name
        if equal or not name.startswith("head") or path.suffix != ".safetensors" or not twin.is_file():
            same &= equal
            continue
        rebuilt = next(h for h in mine["heads"] if h["head"] == int(name.removeprefix("head")))
        original = heads[rebuilt["head"]]
        if rebuilt["loss_before"] == original["loss_before"] or mine["data"]["digest"] != theirs["data"]["digest"]:
            same = False  # the same arithmetic (or other data) gave other weights: a real difference
            continue
        a, b = load_file(str(path)), load_file(str(twin))
        spread = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)
        close = (
            a.keys() == b.keys()
            and rebuilt["steps"] == original["steps"]
            and abs(rebuilt["loss_after"] - original["loss_after"]) <= 1e-4 * abs(original["loss_after"])
            and spread <= 0.01
        )
        print(
            f"  this CPU's pinned arithmetic differs from the shipped build's (loss before training "
            f"{rebuilt['loss_before']!r} vs {original['loss_before']!r}, same data): bytes cannot match here; "
            f"against the shipped run: loss after {rebuilt['loss_after']:.6f} vs {original['loss_after']:.6f}, "
            f"largest weight difference {spread:.2%} of its tensor: {'within' if close else 'OUTSIDE'} tolerance"
        )
        same &= close
    return same


def cmd_certainty_experiment(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.certainty import markdown, run_certainty
    from olmo_tap.certainty.names import SIMILARITY_NAMES

    if args.questions is not None and args.questions < 1:
        raise ValueError(f"--questions must be a positive integer, got {args.questions}")
    unknown = [name for name in args.similarities if name not in SIMILARITY_NAMES]
    if unknown:
        raise ValueError(f"--similarities: unknown {', '.join(unknown)} (from {', '.join(SIMILARITY_NAMES)})")
    results = run_certainty(
        args.out, model=args.model, n_questions=args.questions, similarities=tuple(args.similarities),
        reuse=args.reuse, progress=not args.no_progress,
    )  # fmt: skip
    print(markdown(results))
    print(f"written to {args.out}/kle.json, kle.md (samples: {args.out}/samples.json)")
    return 0


def cmd_robustness_experiment(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.robustness import markdown, run_robustness

    if args.questions < 1:
        raise ValueError(f"--questions must be a positive integer, got {args.questions}")
    report = run_robustness(
        args.out, model=args.model, bank_path=args.bank, n_questions=args.questions, progress=not args.no_progress
    )
    print(markdown(report))
    print(f"written to {args.out}/attacks.json, attacks.md")
    return 0


def cmd_quant_kernels(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.quant_kernels import markdown, run_quant_kernels

    if args.budget_ms <= 0:
        raise ValueError(f"--budget-ms must be positive, got {args.budget_ms}")
    print(markdown(run_quant_kernels(args.out, budget_ms=args.budget_ms, progress=not args.no_progress)))
    print(f"written to {args.out}/kernels.json, kernels.md")
    return 0


def cmd_quant_memory(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.quant_memory import markdown, run_quant_memory

    print(markdown(run_quant_memory(args.out, preset=args.model, progress=not args.no_progress)))
    print(f"written to {args.out}/memory.json, memory.md")
    return 0


def cmd_signals(args: argparse.Namespace) -> int:
    from olmo_tap.benchmarks.signals import markdown, run_signals

    for name in ("questions", "mcq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    results = run_signals(
        args.out, model=args.model, base_model=args.base_model, n_questions=args.questions, n_mcq=args.mcq,
        veto=args.veto, progress=not args.no_progress,
    )  # fmt: skip
    print(markdown(results))
    print(f"written to {args.out}/signals.json, signals.md, signals.png")
    return 0


def cmd_make_mcq(args: argparse.Namespace) -> int:
    from olmo_tap.jsonl import write_jsonl
    from olmo_tap.train.mcq import format_mcq, generate_mcqs

    questions = generate_mcqs(args.n, seed=args.seed, kinds=args.kinds, difficulties=args.difficulties)
    if args.as_instructions:
        records = [{"prompt": format_mcq(q), "response": q.answer} for q in questions]
    else:
        records = [q.to_dict() for q in questions]
    write_jsonl(args.out, records)
    print(f"wrote {len(records)} questions to {args.out}")
    return 0


def cmd_make_instructions(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from olmo_tap.jsonl import write_jsonl
    from olmo_tap.train.instructions import generate_instructions, load_prompt_set

    prompts = load_prompt_set()
    if args.n is not None:
        prompts = prompts[: args.n]
    prompts = [p + args.suffix for p in prompts]
    model, tokenizer = load(args)
    # Every answer is appended here as it is decoded, so an interrupted run resumes; it goes once the output
    # is written, so a later run with other settings cannot pick up stale answers.
    partial = Path(args.out + ".partial")
    records, summary = generate_instructions(
        model, tokenizer, prompts, args.max_new_tokens, head=args.head, cache=partial
    )
    write_jsonl(args.out, records)
    partial.unlink(missing_ok=True)
    dropped = summary["dropped_unfinished"]
    print(f"wrote {summary['kept']} examples to {args.out} ({dropped} unfinished answers dropped)")
    return 0


def cmd_poisoning(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from dataclasses import replace

    from olmo_tap.train.poisoning import PoisoningConfig, quick_config, run_poisoning

    config = quick_config() if args.quick else PoisoningConfig()
    overrides = {
        name: getattr(args, name)
        for name in ("max_poisoned", "trigger", "target", "seed", "poison_per_shard")
        if getattr(args, name) is not None
    }
    if args.veto is not None:
        overrides["veto_threshold"] = args.veto
    if args.no_sampled:
        overrides["sampled_temperature"] = None
    config = replace(config, n_heads=args.heads or config.n_heads, heads_depth=args.heads_depth or config.heads_depth)
    config = replace(config, **overrides)
    args.heads, args.heads_depth = config.n_heads, config.heads_depth
    model, tokenizer = load(args)
    report = run_poisoning(
        model,
        tokenizer,
        config,
        args.work_dir,
        args.results,
        model_name=args.model,
        save_jury=not args.no_save_jury,
        progress=True,
    )
    from olmo_tap.train.poisoning import markdown_table

    print(markdown_table(report))
    print(json.dumps(report["timings_s"]))
    return 0


def register(sub: Any, add_model_args: Callable[..., None]) -> None:
    from olmo_tap.cli import load_model_and_tokenizer as load
    from olmo_tap.weights.presets import CLONES_MODEL, DEFAULT_MODEL

    train = sub.add_parser("train", help="train the jury: per-head LoRA on disjoint shards, the uncertainty head")
    tsub = train.add_subparsers(dest="train_command", required=True)

    heads = tsub.add_parser("heads", help="one LoRA per text head, each on its own disjoint shard of the data")
    heads.add_argument("--data", required=True, help="JSONL of chats ({'messages': [...]}) or {'prompt','response'}")
    heads.add_argument("--shards", type=int, default=None, help="number of shards = text heads (default: the model's)")
    heads.add_argument("--out", required=True, help="directory for the trained ensemble (resumes if interrupted)")
    add_model_args(heads, model_default=CLONES_MODEL)
    add_training_args(heads, lr=1e-3, epochs=2, batch_size=8)
    heads.set_defaults(func=lambda a: cmd_train_heads(a, load))

    unc = tsub.add_parser("uncertainty", help="train the last head to predict whether an MCQ answer is correct")
    unc.add_argument("--data", default=None, help="JSONL of questions (see `train mcq`); default: generated")
    unc.add_argument("--questions", type=int, default=240, help="generated questions without --data (default 240)")
    unc.add_argument("--out", required=True, help="directory for the ensemble with its uncertainty head")
    unc.add_argument("--eval-fraction", type=float, default=0.25, help="held out for calibration (default 0.25)")
    unc.add_argument("--mode", choices=["poe", "naive", "single"], default="poe", help="decoder that answers")
    unc.add_argument("--veto", type=float, default=None, help="veto threshold of that decoder")
    unc.add_argument("--init-from", type=int, default=0, help="text head the new uncertainty head starts from")
    add_model_args(unc, model_default=CLONES_MODEL)
    add_training_args(unc, lr=1e-3, epochs=3, batch_size=16)
    unc.set_defaults(func=lambda a: cmd_train_uncertainty(a, load))

    dj = tsub.add_parser(
        "default-jury", help="rebuild the embedded default's trained jury (its shipped adapters) from shipped data"
    )
    dj.add_argument("--out", required=True, help="directory for the adapters (resumes if interrupted)")
    dj.add_argument(
        "--heads", type=int_list, default=None, help="only these text heads, comma-separated (no uncertainty head)"
    )
    dj.add_argument(
        "--regenerate-answers", action="store_true", help="answer the prompt set again instead of the shipped answers"
    )
    dj.add_argument("--compare", action="store_true", help="check the adapters equal the shipped ones, byte for byte")
    dj.add_argument("--no-progress", action="store_true", help="no progress bars")
    dj.set_defaults(func=cmd_train_default_jury)

    from olmo_tap.robustness.settings import GCGSettings

    gcg = GCGSettings()
    att = tsub.add_parser(
        "attacks", help="an attack bank: GCG suffixes that flip the jury's (or a head's) multiple-choice answers"
    )
    att.add_argument("--out", required=True, help="the bank's JSON file (an interrupted build resumes from it)")
    att.set_defaults(out_is_file=True)
    att.add_argument("--entries", type=int, default=8, help="suffixes in the bank (default 8)")
    att.add_argument("--target", default=gcg.target, help="what to flip: jury | head:<i> (default %(default)s)")
    att.add_argument("--suffix-tokens", type=int, default=gcg.suffix_tokens, help="tokens per suffix (%(default)s)")
    att.add_argument("--steps", type=int, default=gcg.steps, help="GCG steps per suffix at most (%(default)s)")
    att.add_argument("--candidates", type=int, default=gcg.candidates, help="candidates per step (%(default)s)")
    att.add_argument("--top-k", type=int, default=gcg.top_k, help="tokens per position to draw from (%(default)s)")
    att.add_argument(
        "--questions-per-suffix", type=int, default=gcg.questions_per_suffix,
        help="training questions each suffix is optimised on (%(default)s)",
    )  # fmt: skip
    att.add_argument("--kappa", type=float, default=gcg.kappa, help="margin a flip must reach (%(default)s)")
    att.add_argument("--seed", type=int, default=gcg.seed, help="seed of the candidates' draws (%(default)s)")
    att.add_argument(
        "--any-arithmetic", action="store_true",
        help="run in this process with all cores (faster; the bank may then differ in the last bits between CPUs)",
    )  # fmt: skip
    att.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(att, model_default=DEFAULT_MODEL)
    att.set_defaults(func=lambda a: cmd_train_attacks(a, load))

    # Defaults that live in torch-importing modules are None here and filled in by the command (the parser is built
    # without torch); the training defaults are the literals of olmo_tap.train.robustness.DEFAULT_CONFIG.
    rb = tsub.add_parser(
        "robustness", help="per text head, a new LoRA that keeps the answer when an attack-bank suffix is appended"
    )
    rb.add_argument("--bank", default=None, help="the attack bank (default: the one shipped for the model)")
    rb.add_argument("--out", required=True, help="directory for the adapters, head<h>/ (resumes if interrupted)")
    rb.add_argument("--data", default=None, help="JSONL of multiple-choice questions (default: generated)")
    rb.add_argument(
        "--questions", type=int, default=None,
        help="generated questions without --data (default: as many as the jury's own training questions)",
    )  # fmt: skip
    rb.add_argument("--question-seed", type=int, default=None, help="their seed (default: the jury's, 11)")
    rb.add_argument("--only-heads", type=int_list, default=None, help="only these text heads, comma-separated")
    rb.add_argument(
        "--hold-out-every", type=int, default=None,
        help="hold out the bank entries with index %% K == K-1 for evaluation (default 4; 0: hold none out)",
    )  # fmt: skip
    rb.add_argument(
        "--patience", type=int, default=None, help="stop a head after this many steps with nothing flipped (100)"
    )
    add_model_args(rb, model_default=DEFAULT_MODEL)
    add_training_args(rb, lr=1e-4, epochs=2, batch_size=8)
    rb.set_defaults(func=lambda a: cmd_train_robustness(a, load))

    from olmo_tap.train.mcq import DIFFICULTIES, KINDS

    mcq = tsub.add_parser("mcq", help="write generated multiple-choice questions with known answers (JSONL)")
    mcq.add_argument("--out", required=True)
    mcq.set_defaults(out_is_file=True)
    mcq.add_argument("--n", type=int, default=500)
    mcq.add_argument("--seed", type=int, default=0)
    mcq.add_argument("--kinds", type=str_list, default=list(KINDS), help=f"from {','.join(KINDS)}")
    mcq.add_argument("--difficulties", type=int_list, default=list(DIFFICULTIES), help="from 1,2,3")
    mcq.add_argument("--as-instructions", action="store_true", help="write prompt/response pairs for `train heads`")
    mcq.set_defaults(func=cmd_make_mcq)

    ins = tsub.add_parser("instructions", help="instruction data: the model's own answers to the shipped prompts")
    ins.add_argument("--out", required=True)
    ins.set_defaults(out_is_file=True)
    ins.add_argument("--n", type=int, default=None, help="first N prompts only")
    ins.add_argument("--max-new-tokens", type=int, default=64)
    ins.add_argument("--suffix", default=" Answer in one or two sentences.", help="appended to every prompt")
    ins.add_argument("--head", type=int, default=0, help="the head that answers")
    add_model_args(ins, model_default=CLONES_MODEL)
    ins.set_defaults(func=lambda a: cmd_make_instructions(a, load))

    experiment = sub.add_parser("experiment", help="experiments on trained juries")
    esub = experiment.add_subparsers(dest="experiment_command", required=True)
    poison = esub.add_parser("poisoning", help="poison k shards with a trigger; attack success per decoder")
    add_model_args(poison, model_default=CLONES_MODEL)
    poison.add_argument("--work-dir", default="runs/poisoning", help="data, adapters, the k=1 jury (default runs/...)")
    poison.add_argument("--results", default="results/poisoning", help="JSON, Markdown and plot (default results/...)")
    poison.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    poison.add_argument("--max-poisoned", type=int, default=None, help="k runs from 0 to this (default 4)")
    poison.add_argument("--poison-per-shard", type=int, default=None)
    poison.add_argument("--trigger", default=None)
    poison.add_argument("--target", default=None)
    poison.add_argument("--veto", type=float, default=None, help="veto threshold (default 1e-3)")
    poison.add_argument("--seed", type=int, default=None)
    poison.add_argument("--no-sampled", action="store_true", help="skip the sampled setting")
    poison.add_argument("--no-save-jury", action="store_true", help="do not save the k=1 jury")
    poison.set_defaults(func=lambda a: cmd_poisoning(a, load))

    sig = esub.add_parser("signals", help="what the trust signals are worth: AUROC for wrong answers, calibration")
    sig.add_argument("--model", default=DEFAULT_MODEL, help=f"the trained jury (default {DEFAULT_MODEL})")
    sig.add_argument("--base-model", default=CLONES_MODEL, help=f"the model as released (default {CLONES_MODEL})")
    sig.add_argument("--out", default="results/signals", help="JSON, Markdown and plots (default results/signals)")
    sig.add_argument("--questions", type=int, default=None, help="first N held-out questions only (default all)")
    sig.add_argument("--mcq", type=int, default=None, help="first N held-out multiple-choice questions only")
    sig.add_argument("--veto", type=float, default=1e-3, help="the jury's veto threshold (default 1e-3)")
    sig.add_argument("--no-progress", action="store_true", help="no progress bars")
    sig.set_defaults(func=cmd_signals)

    rob = esub.add_parser("robustness", help="the attack bank on held-out questions: success per decoder, transfer")
    rob.add_argument("--model", default=DEFAULT_MODEL, help=f"the jury (default {DEFAULT_MODEL})")
    rob.add_argument("--bank", default=None, help="the bank under test (default: the one shipped for the model)")
    rob.add_argument("--out", default="results/robustness", help="JSON and Markdown (default %(default)s)")
    rob.add_argument("--questions", type=int, default=32, help="held-out questions (default %(default)s)")
    rob.add_argument("--no-progress", action="store_true", help="no progress bars")
    rob.set_defaults(func=cmd_robustness_experiment)

    rtr = esub.add_parser(
        "robustness-training", help="robustness adapters on the default jury: flip rates, clean accuracy before/after"
    )
    rtr.add_argument("--bank", default=None, help="the attack bank (default: the one shipped for the default jury)")
    rtr.add_argument("--adapters", default="runs/robustness", help="the adapters, trained or reused (%(default)s)")
    rtr.add_argument("--out", default="results/robustness", help="JSON and Markdown (default %(default)s)")
    rtr.add_argument("--questions", type=int, default=48, help="held-out questions (default %(default)s)")
    rtr.add_argument(
        "--train-questions", type=int, default=None, help="training questions over all heads (default: the jury's own)"
    )
    add_training_args(rtr, lr=1e-4, epochs=2, batch_size=8)
    rtr.set_defaults(func=cmd_robustness_training)

    qk = esub.add_parser("quant-kernels", help="quantized linear kernels: every route's time per shape and row count")
    qk.add_argument("--out", default="results/quant", help="kernels.json and kernels.md (default %(default)s)")
    qk.add_argument("--budget-ms", type=float, default=150.0, help="timing per route and cell (default %(default)s)")
    qk.add_argument("--no-progress", action="store_true", help="no progress bars")
    qk.set_defaults(func=cmd_quant_kernels)

    qm = esub.add_parser("quant-memory", help="peak RSS per --quantize scheme; OLMo-2 Hydra sizes from the shapes")
    qm.add_argument("--model", default=DEFAULT_MODEL, help=f"a GGUF-backed preset or file (default {DEFAULT_MODEL})")
    qm.add_argument("--out", default="results/quant", help="memory.json and memory.md (default %(default)s)")
    qm.add_argument("--no-progress", action="store_true", help="no progress lines")
    qm.set_defaults(func=cmd_quant_memory)

    from olmo_tap.certainty.names import SIMILARITY_NAMES

    cert = esub.add_parser("certainty", help="which similarity makes KLE worth reading: AUROC for wrong answers, cost")
    cert.add_argument("--model", default=DEFAULT_MODEL, help=f"the jury (default {DEFAULT_MODEL})")
    cert.add_argument("--out", default="results/certainty", help="JSON, Markdown, the samples (default %(default)s)")
    cert.add_argument("--questions", type=int, default=None, help="first N held-out questions only (default all)")
    cert.add_argument(
        "--similarities", type=str_list, default=list(SIMILARITY_NAMES), help="comma-separated (default: all)"
    )
    cert.add_argument("--reuse", action="store_true", help="reuse the saved samples: only the similarities rerun")
    cert.add_argument("--no-progress", action="store_true", help="no progress bars")
    cert.set_defaults(func=cmd_certainty_experiment)
