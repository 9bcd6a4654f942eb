"""``olmo-tap train heads``: one LoRA per text head, each on its own disjoint shard, trunk frozen.

Pipeline: read the examples, split them into one shard per text head by stable hash
(``olmo_tap.train.data``), tokenise with the chat template, run the frozen trunk once per example
and keep its output (the trunk never changes, so its activations are reused by every epoch), then
train head ``h``'s adapter on shard ``h`` with next-token cross-entropy on the reply's tokens.
Only the adapter's parameters receive gradients; the model's tensors are not written until the
end, when each adapter is merged into its own head (``olmo_tap.weights.lora.merge_lora``), so the
trunk, the shared lm_head and every other head stay bit-identical.

Output directory ``--out`` (loadable with ``--model <out>`` by every command):

- the ensemble (``hydra_config.json``, ``model.safetensors``, tokenizer), merged heads;
- ``adapters/head{h}/``: each head's adapter in PEFT's layout, for ``load_ensemble(base, adapters)``;
- ``training.json``: settings, shard sizes and the loss of every head before and after training.

While training runs, ``<out>/.training/`` holds one checkpoint per head and the adapters of the
heads already finished; running the same command again resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.train.adapter import AdaptedHead, HeadAdapter
from olmo_tap.train.data import ChatExample, EncodedExample, encode_example, shard_examples
from olmo_tap.train.trainer import TrainConfig, TrainResult, evaluate, new_adapter, train_adapter
from olmo_tap.weights.ensemble import CONFIG_FILE, save_ensemble
from olmo_tap.weights.lora import load_lora, merge_lora
from olmo_tap.weights.tokenizer import vocab_limit

WORK_DIR = ".training"


@dataclass(frozen=True)
class LMItem:
    """One example ready for the head: frozen trunk output of ``ids[:-1]`` and the reply's targets."""

    trunk: torch.Tensor  # (seq, d_model): the trunk's output for every input position
    first_target: int  # index of the input position whose next token is the reply's first token
    targets: torch.Tensor  # (n_targets,) token ids


def trunk_states(
    model: HydraTransformer, sequences: Sequence[Sequence[int]], progress: bool = True, desc: str = "trunk"
) -> list[torch.Tensor]:
    """The frozen trunk's output (seq, d_model) for each token sequence, computed once, uncached."""
    states = []
    with torch.no_grad():
        for ids in tqdm(sequences, desc=desc, disable=not progress, unit="ex", leave=False):
            hidden = model.forward_trunk(torch.tensor([list(ids)], device=model.device))
            states.append(hidden[0])
    return states


def lm_items(model: HydraTransformer, encoded: Sequence[EncodedExample], progress: bool = True) -> list[LMItem]:
    states = trunk_states(model, [e.ids[:-1] for e in encoded], progress)
    return [
        LMItem(state, e.n_prompt - 1, torch.tensor(e.ids[e.n_prompt :], device=model.device))
        for e, state in zip(encoded, states, strict=True)
    ]


def pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Right-pad (seq_i, d) tensors with zeros into (batch, max_seq, d). Causal attention never lets a real
    position see the padding after it, so padding changes no real position's output."""
    longest = max(s.size(0) for s in states)
    out = states[0].new_zeros(len(states), longest, states[0].size(-1))
    for i, s in enumerate(states):
        out[i, : s.size(0)] = s
    return out


def lm_loss_fn(model: HydraTransformer, head: int, vocab_size: int):
    """Summed next-token cross-entropy over the replies' tokens of a batch, and the number of tokens."""

    def loss_fn(adapter: HeadAdapter, batch: Sequence[LMItem]) -> tuple[torch.Tensor, int]:
        hidden = AdaptedHead(model, head, adapter).hidden(pad_states([item.trunk for item in batch]))
        rows, targets = [], []
        for i, item in enumerate(batch):
            n = item.targets.numel()
            rows.append(hidden[i, item.first_target : item.first_target + n])
            targets.append(item.targets)
        # The lm_head only for positions that have a target: the reply is a small part of each sequence.
        logits = model.project(torch.cat(rows).unsqueeze(0))[0, :, :vocab_size].float()
        target = torch.cat(targets)
        return F.cross_entropy(logits, target, reduction="sum"), target.numel()

    return loss_fn


def _shard_digest(shard: Sequence[ChatExample]) -> str:
    return hashlib.sha256("".join(e.key for e in shard).encode()).hexdigest()


def prepare_output(out: Path) -> Path:
    """The work directory inside ``out``, refusing to clobber a directory that is not ours."""
    work = out / WORK_DIR
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).exists() and not work.exists():
        raise ValueError(f"output directory {out} exists and is neither a saved ensemble nor a training run")
    work.mkdir(parents=True, exist_ok=True)
    return work


def train_head_on_examples(
    model: HydraTransformer,
    tokenizer: Any,
    head: int,
    examples: Sequence[ChatExample],
    config: TrainConfig,
    *,
    checkpoint: Path | None = None,
    progress: bool = True,
    items: Sequence[LMItem] | None = None,
    max_steps: int | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train one head's adapter on ``examples`` (or on precomputed ``items``); the model is not changed."""
    if items is None:
        encoded = [encode_example(tokenizer, e, model.base_config.max_seq_len) for e in examples]
        items = lm_items(model, encoded, progress)
    loss_fn = lm_loss_fn(model, head, vocab_limit(tokenizer, model.base_config.vocab_size))
    # B starts at zero, so a fresh adapter measures the head as it is.
    before = evaluate(loss_fn, new_adapter(model, head, config), items, config.batch_size)
    result = train_adapter(
        model,
        head,
        items,
        loss_fn,
        config,
        checkpoint=checkpoint,
        fingerprint={"data": _shard_digest(examples)},
        max_steps=max_steps,
        progress=progress,
        desc=f"head {head} ({len(items)} examples)",
    )
    after = evaluate(loss_fn, result.adapter, items, config.batch_size) if result.completed else None
    stats = {
        "head": head,
        "examples": len(items),
        "target_tokens": int(sum(item.targets.numel() for item in items)),
        "steps": result.steps,
        "loss_before": before,
        "loss_after": after,
        "first_step_loss": result.losses[0] if result.losses else None,
        "last_step_loss": result.losses[-1] if result.losses else None,
    }
    return result, stats


def finished_adapter(
    model: HydraTransformer, head: int, done_dir: Path, tag: dict[str, Any], progress: bool = True
) -> tuple[HeadAdapter, dict[str, Any]] | None:
    """The adapter (and its stats) that a run with the same ``tag`` (data and settings) saved for ``head`` in
    ``done_dir`` (``HeadAdapter.save`` with metadata ``{"run": tag, "stats": ...}``), else None."""
    stats_file = done_dir / "olmo_tap_training.json"
    if not stats_file.is_file():
        return None
    saved = json.loads(stats_file.read_text())
    if saved.get("run") != tag or saved.get("stats", {}).get("head") != head:
        return None
    if progress:
        print(f"{done_dir.name}: already trained, reusing {done_dir}")
    return HeadAdapter.from_lora(model.base_config, load_lora(done_dir)).to(model.device), saved["stats"]


def train_or_reuse(
    model: HydraTransformer,
    tokenizer: Any,
    head: int,
    examples: Sequence[ChatExample],
    config: TrainConfig,
    work: Path,
    name: str,
    *,
    items: Sequence[LMItem] | None = None,
    base_name: str | None = None,
    progress: bool = True,
) -> tuple[HeadAdapter, dict[str, Any]]:
    """Head ``head``'s adapter for ``examples``: the one finished earlier in ``work/name`` by a run with the
    same data and settings, else trained now (resuming ``work/name.ckpt`` if present) and saved there."""
    done_dir = work / name
    tag = _run_tag(config, examples)
    finished = finished_adapter(model, head, done_dir, tag, progress)
    if finished is not None:
        return finished
    result, stats = train_head_on_examples(
        model, tokenizer, head, examples, config, checkpoint=work / f"{name}.ckpt", items=items, progress=progress
    )
    result.adapter.save(done_dir, base_name, {"run": tag, "stats": stats})
    (work / f"{name}.ckpt").unlink(missing_ok=True)
    return result.adapter, stats


def train_heads(
    model: HydraTransformer,
    tokenizer: Any,
    examples: Sequence[ChatExample],
    config: TrainConfig,
    out: str | Path,
    *,
    n_shards: int | None = None,
    base_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Shard ``examples`` over the text heads, train one adapter per head, merge and save the ensemble to ``out``.

    Resumes from ``out/.training`` when a previous run with the same data and settings was interrupted.
    Returns the training report (also written to ``out/training.json``).
    """
    started = time.perf_counter()
    n_text = model.n_text_heads
    n_shards = n_text if n_shards is None else n_shards
    if n_shards != n_text:
        raise ValueError(
            f"{n_shards} shards for {n_text} text heads: one shard per text head "
            f"(load the model with --heads {n_shards}, or pass --shards {n_text})"
        )
    shards = shard_examples(examples, n_shards)
    out = Path(out)
    work = prepare_output(out)
    adapters: list[HeadAdapter] = []
    head_stats: list[dict[str, Any]] = []
    for head, shard in enumerate(shards):
        adapter, stats = train_or_reuse(
            model, tokenizer, head, shard, config, work, f"head{head}", base_name=base_name, progress=progress
        )
        adapters.append(adapter)
        head_stats.append(stats)
    for head, adapter in enumerate(adapters):
        merge_lora(model, head, adapter.to_lora_adapter())
    report = {
        "base_model": base_name,
        "n_text_heads": n_text,
        "heads_depth": model.config.head_layers,
        "uncertainty_head": model.uncertainty_head,
        "examples": len(examples),
        "shard_sizes": [len(s) for s in shards],
        "sharding": "sha256 of each example's canonical JSON, first 16 hex digits mod n_shards",
        "config": config.to_dict(),
        "heads": head_stats,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    save_trained_ensemble(model, tokenizer, out, adapters, report)
    return report


def _run_tag(config: TrainConfig, shard: Sequence[ChatExample]) -> dict[str, Any]:
    return {"config": config.to_dict(), "data": _shard_digest(shard)}


def save_trained_ensemble(
    model: HydraTransformer,
    tokenizer: Any,
    out: Path,
    adapters: Sequence[HeadAdapter | None],
    report: dict[str, Any],
    uncertainty_adapter: HeadAdapter | None = None,
) -> Path:
    """Save the merged ensemble to ``out`` (replacing the work directory), then its adapters and report."""
    save_ensemble(
        model,
        out,
        tokenizer,
        uncertainty_head=model.uncertainty_head is not None,
        metadata={"training": report},
        work_dir=WORK_DIR,
    )
    for head, adapter in enumerate(adapters):
        if adapter is not None:
            adapter.save(out / "adapters" / f"head{head}", report.get("base_model"))
    if uncertainty_adapter is not None:
        uncertainty_adapter.save(out / "adapters" / "uncertainty", report.get("base_model"))
    (out / "training.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return out
