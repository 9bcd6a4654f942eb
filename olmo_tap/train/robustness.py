"""``olmo-tap train robustness``: per text head, a new LoRA that keeps its answer when an attack suffix is appended.

The original system's robustness post-training, on our training loop (``olmo_tap.train.trainer``):

- the model is taken as loaded: each text head already carries its security LoRA, merged (for the embedded default,
  ``smollm2-135m-instruct`` = the clones + ``default_jury/head{h}``); head ``h`` gets a *fresh* LoRA on top of it,
  and the model itself is never written;
- the data are pairs (question, question + " " + suffix) (``olmo_tap.robustness.gcg.attacked_text``) of multiple-
  choice questions (by default the jury's own training questions, ``default_jury.MCQ_TRAIN``) and the bank's
  *training* suffixes. The questions are sharded as the security data are (``shard_examples`` on ``mcq_example``:
  sha256 of the example, mod the number of text heads), so head ``h`` trains on the questions its security LoRA
  was trained on and no other head sees them. Questions a bank suffix was optimised on are dropped (they would make
  the pairs easier than an unseen question's);
- the objective at the answer position (the last prompt token): the current head's clean next-token distribution,
  without gradient, is the target and the attacked pass's log-probabilities the input, ``KL(clean || attacked)``
  summed over the pairs whose argmax token flips (the others contribute nothing) and divided by the fixed batch
  size (``torch.nn.KLDivLoss(reduction="sum") / B``, as the original). A batch in which nothing flips makes no
  update, and a head stops early after ``patience`` such steps in a row (the original's ``stagnant_thresh``).
  One difference: the original accumulates gradients until B flipped pairs are seen before an optimizer step; here
  each batch of B pairs is one step (the trainer's fixed, seeded batches make a run resumable bit for bit);
- held-out suffixes: bank entries whose ``index % hold_out_every == hold_out_every - 1`` (default 4: indices 3 and 7
  of an 8-entry bank) are never trained on; they are for the evaluation (``olmo-tap experiment
  robustness-training``). ``robustness.json`` records both lists.

The frozen trunk's states are computed once per prompt (the clean prompt and each attacked one) and reused by every
epoch; only the head's layers run during training (``olmo_tap.train.adapter.AdaptedHead``).

Output ``--out DIR``: ``DIR/head{h}/`` per text head, a PEFT-layout adapter (with ``olmo_tap_training.json``: the
run's settings and the head's statistics), and ``DIR/robustness.json`` (settings, the bank and its fingerprint, the
suffixes trained and held out, per head the pairs flipped and the loss before and after, the time). Stack them on
the security adapters with ``load_ensemble(base, [[security_h, DIR/head{h}] for h ...])``. While training runs,
``DIR/.training/`` holds one checkpoint per head; the same command resumes from there and reuses finished heads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.prompts import encode_chat
from olmo_tap.robustness.bank import AttackBank, BankEntry, BankError, model_fingerprint
from olmo_tap.robustness.gcg import attacked_text, question_digest
from olmo_tap.train.adapter import AdaptedHead, HeadAdapter
from olmo_tap.train.data import shard_examples
from olmo_tap.train.lora_heads import WORK_DIR, finished_adapter, pad_states, trunk_states
from olmo_tap.train.mcq import MCQ, format_mcq, mcq_example
from olmo_tap.train.trainer import LossFn, TrainConfig, new_adapter, train_adapter
from olmo_tap.weights.tokenizer import vocab_limit

HOLD_OUT_EVERY = 4
PATIENCE = 100  # the original's stagnant_thresh: steps in a row with no flipped pair
REPORT_FILE = "robustness.json"
# The command's defaults. The original's learning rate (1e-4; it used batch 16, one epoch, r 16 on a 7B model): on the
# embedded default's head 0 (19 questions x 6 suffixes), 1e-3 and 3e-4 removed every flip on held-out suffixes but
# pushed the head's clean answers toward one letter (34% -> 22% right on 32 held-out questions); 1e-4 halved the flips
# (94% -> 44%) for 6 points. Batch 8 and two epochs: a head has a hundred-odd pairs, not thousands.
DEFAULT_CONFIG = TrainConfig(rank=8, alpha=16.0, lr=1e-4, epochs=2, batch_size=8, seed=0)


# ----- the bank's suffixes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuffixSplit:
    """The bank's entries trained on and held out for evaluation, by ``index`` (see ``split_suffixes``)."""

    trained: list[BankEntry]
    held_out: list[BankEntry]
    hold_out_every: int

    @property
    def rule(self) -> str:
        k = self.hold_out_every
        return f"held out: entries with index % {k} == {k - 1}" if k else "none held out"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "trained": [{"index": e.index, "suffix": e.suffix} for e in self.trained],
            "held_out": [{"index": e.index, "suffix": e.suffix} for e in self.held_out],
        }


def split_suffixes(bank: AttackBank, hold_out_every: int = HOLD_OUT_EVERY, where: str = "the bank") -> SuffixSplit:
    """Entry ``e`` is held out when ``e.index % hold_out_every == hold_out_every - 1`` (0: none is). The rule reads
    the build index, not the rank, so an entry stays on its side whatever the bank's order or size."""
    if not isinstance(hold_out_every, int) or hold_out_every < 0 or hold_out_every == 1:
        raise ValueError(f"hold_out_every must be 0 (hold none out) or an integer >= 2, got {hold_out_every!r}")
    if not bank.entries:
        raise BankError(f"{where} holds no suffixes: nothing to train on (build one with `olmo-tap train attacks`)")
    k = hold_out_every
    held = [e for e in bank.entries if k and e.index % k == k - 1]
    trained = [e for e in bank.entries if not (k and e.index % k == k - 1)]
    if not trained:
        raise BankError(
            f"{where}: every entry ({[e.index for e in held]}) is held out by index % {k} == {k - 1}; "
            "none is left to train on (use a bank with more entries, or --hold-out-every 0)"
        )
    return SuffixSplit(trained, held, k)


def bank_questions(bank: AttackBank) -> set[str]:
    """Digests (``question_digest``) of every question a suffix of ``bank`` was optimised on."""
    return {d for e in bank.entries for d in e.questions}


def check_bank_model(bank: AttackBank, fingerprint: str, model_name: str | None, where: str = "the bank") -> bool:
    """Warn (on stderr) when the bank's suffixes were optimised against other weights than ``fingerprint``'s."""
    if bank.fingerprint == fingerprint:
        return True
    print(
        f"warning: {where} was built against {bank.model_name or 'another model'} ({bank.fingerprint}), not the "
        f"weights being trained ({model_name or 'this model'}, {fingerprint}); its suffixes still apply as text, "
        "but they were not optimised against these heads",
        file=sys.stderr,
    )
    return False


# ----- pairs and the objective ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One (question, question + suffix) pair as the head sees it: the frozen trunk's states of both prompts."""

    clean: torch.Tensor  # (seq, d_model); shared by the pairs of one question
    attacked: torch.Tensor  # (seq', d_model)


def pair_items(
    model: HydraTransformer,
    tokenizer: Any,
    questions: Sequence[MCQ],
    suffixes: Sequence[str],
    progress: bool = True,
    desc: str = "trunk",
) -> list[Pair]:
    """Every (question, suffix) pair, question-major; the trunk runs once per distinct prompt."""
    texts = [format_mcq(q) for q in questions]
    prompts = [encode_chat(tokenizer, t) for t in texts]
    prompts += [encode_chat(tokenizer, attacked_text(t, s)) for t in texts for s in suffixes]
    longest = max(len(p) for p in prompts)
    if longest > model.base_config.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens exceeds the model's context of {model.base_config.max_seq_len}")
    states = trunk_states(model, prompts, progress, desc)
    n, k = len(texts), len(suffixes)
    return [Pair(states[i], states[n + i * k + j]) for i in range(n) for j in range(k)]


def answer_logits(
    model: HydraTransformer, head: int, adapter: HeadAdapter | None, states: Sequence[torch.Tensor], vocab: int
) -> torch.Tensor:
    """(batch, vocab) float logits of head ``head`` (with ``adapter``) at each prompt's last position."""
    hidden = AdaptedHead(model, head, adapter).hidden(pad_states(states))
    last = torch.tensor([s.size(0) - 1 for s in states], device=hidden.device)
    rows = hidden[torch.arange(len(states), device=hidden.device), last]
    return model.project(rows.unsqueeze(0))[0, :, :vocab].float()


PairFn = Callable[[HeadAdapter | None, Sequence[Pair]], tuple[torch.Tensor, torch.Tensor]]


def kl_and_flips(model: HydraTransformer, head: int, vocab: int) -> PairFn:
    """``fn(adapter, pairs) -> (kl, flipped)``: per pair KL(clean || attacked) of the head's next-token
    distributions at the answer position (differentiable through the attacked pass only: the clean one is the
    target, computed with the same adapter without gradient), and whether the argmax token differs."""

    def fn(adapter: HeadAdapter | None, batch: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            clean = answer_logits(model, head, adapter, [p.clean for p in batch], vocab)
        attacked = answer_logits(model, head, adapter, [p.attacked for p in batch], vocab)
        log_p = torch.log_softmax(clean, dim=-1)
        log_q = torch.log_softmax(attacked, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl, clean.argmax(-1) != attacked.argmax(-1)

    return fn


def robustness_loss_fn(pairs: PairFn, batch_size: int) -> LossFn:
    """The trainer's loss: KL summed over the flipped pairs of the batch, over the fixed ``batch_size`` (count 0,
    no update, when nothing flipped)."""

    def loss_fn(adapter: HeadAdapter, batch: Sequence[Pair]) -> tuple[torch.Tensor, int]:
        kl, flipped = pairs(adapter, batch)
        if not bool(flipped.any()):
            return kl.new_zeros(()), 0
        return kl[flipped].sum(), batch_size

    return loss_fn


def pair_stats(pairs: PairFn, adapter: HeadAdapter | None, items: Sequence[Pair], batch_size: int) -> dict[str, Any]:
    """Over all ``items``: pairs, pairs flipped, the objective per pair (KL summed over the flipped / pairs) and
    the mean KL over every pair."""
    kls, flips = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            kl, flipped = pairs(adapter, items[start : start + batch_size])
            kls.append(kl)
            flips.append(flipped)
    kl, flipped = torch.cat(kls), torch.cat(flips)
    n = len(items)
    return {
        "pairs": n,
        "flipped": int(flipped.sum()),
        "loss": float(kl[flipped].sum()) / n,
        "kl_mean": float(kl.mean()),
    }


def stagnated(patience: int) -> Callable[[list[float]], bool]:
    """True once the last ``patience`` steps had nothing flipped. Such a step's loss is exactly 0 (the trainer
    records 0 for a batch without targets), and a flipped pair's KL is > 0 (two distributions with different
    argmax differ)."""

    def stop(losses: list[float]) -> bool:
        return len(losses) >= patience and not any(losses[-patience:])

    return stop


# ----- training -------------------------------------------------------------------------------------------------


def shard_questions(questions: Sequence[MCQ], n_shards: int) -> list[list[MCQ]]:
    """The questions split as the security data are: ``shard_examples`` on each question's training example."""
    by_key = {mcq_example(q).key: q for q in questions}
    return [[by_key[e.key] for e in shard] for shard in shard_examples([mcq_example(q) for q in questions], n_shards)]


def _digest(questions: Sequence[MCQ]) -> str:
    return hashlib.sha256("".join(mcq_example(q).key for q in questions).encode()).hexdigest()


def prepare_output(out: Path) -> Path:
    """The work directory inside ``out``, refusing to write into a directory that is not a robustness run."""
    work = out / WORK_DIR
    if out.exists() and any(out.iterdir()) and not (out / REPORT_FILE).exists() and not work.exists():
        raise ValueError(f"output directory {out} exists and is not a robustness training run; choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    return work


def train_robustness(
    model: HydraTransformer,
    tokenizer: Any,
    bank: AttackBank,
    questions: Sequence[MCQ],
    config: TrainConfig,
    out: str | Path,
    *,
    heads: Sequence[int] | None = None,
    hold_out_every: int = HOLD_OUT_EVERY,
    patience: int = PATIENCE,
    base_name: str | None = None,
    bank_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a robustness adapter for each text head in ``heads`` (default: all) into ``out/head{h}``; the model is
    not changed. Returns the report (also written to ``out/robustness.json``)."""
    started = time.perf_counter()
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be a positive integer, got {patience!r}")
    where = str(bank_path) if bank_path is not None else "the bank"
    split = split_suffixes(bank, hold_out_every, where)
    n_text = model.n_text_heads
    wanted = list(range(n_text)) if heads is None else sorted(set(heads))
    if not wanted or any(not 0 <= h < n_text for h in wanted):
        raise ValueError(f"heads must be text heads in 0..{n_text - 1}, got {list(heads or [])}")
    seen = bank_questions(bank)
    kept = [q for q in questions if question_digest(q) not in seen]
    shards = shard_questions(kept, n_text)
    fingerprint = model_fingerprint(model)
    matches = check_bank_model(bank, fingerprint, base_name, where)
    suffixes = [e.suffix for e in split.trained]
    vocab = vocab_limit(tokenizer, model.base_config.vocab_size)
    out = Path(out)
    work = prepare_output(out)
    head_stats, reused = [], []
    for head in wanted:
        shard = shards[head]
        tag = {
            "config": config.to_dict(),
            "data": _digest(shard),
            "suffixes": suffixes,
            "patience": patience,
            "model": fingerprint,
        }
        done = finished_adapter(model, head, out / f"head{head}", tag, progress)
        if done is not None:
            head_stats.append(done[1])
            reused.append(head)
            continue
        t0 = time.perf_counter()
        items = pair_items(model, tokenizer, shard, suffixes, progress, desc=f"head {head}: trunk states")
        pairs = kl_and_flips(model, head, vocab)
        before = pair_stats(pairs, new_adapter(model, head, config), items, config.batch_size)  # B = 0: as loaded
        result = train_adapter(
            model, head, items, robustness_loss_fn(pairs, config.batch_size), config,
            checkpoint=work / f"head{head}.ckpt", fingerprint=tag, progress=progress,
            desc=f"head {head} ({len(items)} pairs)", early_stop=stagnated(patience),
        )  # fmt: skip
        after = pair_stats(pairs, result.adapter, items, config.batch_size)
        stats = {
            "head": head,
            "questions": len(shard),
            "pairs": len(items),
            "steps": result.steps,
            "updates": sum(loss > 0 for loss in result.losses),
            "stopped_early": result.stopped_early,
            "flipped_before": before["flipped"],
            "flipped_after": after["flipped"],
            "loss_before": before["loss"],
            "loss_after": after["loss"],
            "kl_mean_before": before["kl_mean"],
            "kl_mean_after": after["kl_mean"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        result.adapter.save(out / f"head{head}", base_name, {"run": tag, "stats": stats})
        (work / f"head{head}.ckpt").unlink(missing_ok=True)
        head_stats.append(stats)
    report = {
        "base_model": base_name,
        "stacked_on": "each text head as loaded (its security adapter merged); load with "
        "load_ensemble(base, [[security_h, <out>/head{h}], ...])",
        "model_fingerprint": fingerprint,
        "objective": "KL(clean || attacked) at the answer position, summed over the pairs whose argmax flips, "
        "divided by the batch size; clean distribution from the current head without gradient",
        "bank": {
            "path": str(bank_path) if bank_path is not None else None,
            "model": bank.model_name,
            "fingerprint": bank.fingerprint,
            "matches_model": matches,
            "entries": len(bank.entries),
        },
        "suffixes": split.to_dict(),
        "questions": {
            "given": len(questions),
            "dropped_bank_questions": len(questions) - len(kept),
            "used": len(kept),
            "shard_sizes": [len(s) for s in shards],
            "sharding": "as the security data: sha256 of each question's training example, first 16 hex digits "
            "mod the number of text heads",
        },
        "config": config.to_dict(),
        "patience": patience,
        "heads": head_stats,
        "reused_heads": reused,  # finished by an earlier run with the same data and settings (their stats are its)
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return report
