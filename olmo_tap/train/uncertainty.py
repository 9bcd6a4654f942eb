"""``olmo-tap train uncertainty``: teach the last head to say whether the jury's multiple-choice answer is right.

1. The ensemble answers each question with the decoder users run (PoE by default, greedy); the
   answer is labelled correct or wrong against the known answer (``olmo_tap.train.mcq``).
2. For each answer, the *witness* is the hidden state PoE itself keeps for its uncertainty path
   (``PoEStream.witness_hidden``): the answering head's pre-norm hidden state at the last prompt position.
3. The uncertainty head (added as the last head, starting as a copy of a text head, if the model
   has none) gets a LoRA adapter trained on PoE's second-pass prompt with the witness injected into
   the residual stream at its last position, by binary cross-entropy on ``logit A - logit B``: the
   very quantity ``PoE.get_uncertainty_score`` turns into ``p(correct) = sigmoid(logit A - logit B)``.
4. Calibration (ECE, Brier, AUROC, reliability diagram) is measured on held-out questions before and
   after training, and the ensemble is saved with ``uncertainty_head`` set.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer, HydraTransformerConfig
from olmo_tap.inference.prompts import encode_chat, uncertainty_prompt
from olmo_tap.train.adapter import AdaptedHead, HeadAdapter
from olmo_tap.train.calibration import calibration_report, plot_reliability
from olmo_tap.train.lora_heads import pad_states, prepare_output, save_trained_ensemble, trunk_states
from olmo_tap.train.mcq import MCQ, format_mcq, parse_choice
from olmo_tap.train.trainer import TrainConfig, derived_seed, evaluate, new_adapter, train_adapter
from olmo_tap.weights.lora import merge_lora


@dataclass
class JuryAnswer:
    question: MCQ
    answer_text: str
    correct: bool
    witness: torch.Tensor  # (d_model,): PoE's own witness for this answer (``PoEStream.witness_hidden``)
    resampled: bool


def answer_questions(
    model: HydraTransformer,
    tokenizer: Any,
    questions: Sequence[MCQ],
    *,
    mode: str = "poe",
    veto_threshold: float | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> tuple[list[JuryAnswer], int]:
    """The jury's answers with their labels and witnesses; also the number of abstentions (left out)."""
    from olmo_tap.inference.poe import PoE

    decoder = PoE(
        model,
        tokenizer,
        n_llm_heads=model.n_text_heads,
        max_new_tokens=max_new_tokens,
        mode=mode,
        veto_threshold=veto_threshold,
    )
    answers, abstained = [], 0
    for i, q in enumerate(tqdm(questions, desc="jury answers", disable=not progress, unit="q")):
        # A different seed per question: the draft head (and so the witness) varies as it does in use.
        stream = decoder.stream(format_mcq(q), temperature=temperature, seed=derived_seed(seed, i) % 2**31)
        for _ in stream:
            pass
        output, witness = stream.output, stream.witness_hidden
        if not output.token_ids or witness is None:
            abstained += 1
            continue
        text = output.text.strip()
        answers.append(
            JuryAnswer(q, text, parse_choice(text) == q.answer, witness, bool(output.resampled_idxs[:1] == [1]))
        )
    return answers, abstained


@dataclass(frozen=True)
class UncertaintyItem:
    trunk: torch.Tensor  # (seq, d_model): the trunk's output for the second-pass prompt
    witness: torch.Tensor  # (d_model,)
    label: float  # 1.0 correct, 0.0 wrong


def uncertainty_items(
    model: HydraTransformer, tokenizer: Any, answers: Sequence[JuryAnswer], progress: bool = True
) -> list[UncertaintyItem]:
    prompts = [encode_chat(tokenizer, uncertainty_prompt(format_mcq(a.question), a.answer_text)) for a in answers]
    states = trunk_states(model, prompts, progress, desc="trunk (second pass)")
    return [UncertaintyItem(s, a.witness, float(a.correct)) for s, a in zip(states, answers, strict=True)]


def answer_logit_ids(tokenizer: Any) -> tuple[int, int]:
    """Token ids of "A" and "B", as PoE takes them."""
    return tokenizer.encode("A", add_special_tokens=False)[0], tokenizer.encode("B", add_special_tokens=False)[0]


def margin_fn(model: HydraTransformer, head: int, a_id: int, b_id: int):
    """logit A - logit B at each item's last position, the witness injected there."""

    def margins(adapter: HeadAdapter | None, batch: Sequence[UncertaintyItem]) -> torch.Tensor:
        states = pad_states([item.trunk for item in batch])
        residual = torch.zeros_like(states)
        last = torch.tensor([item.trunk.size(0) - 1 for item in batch], device=states.device)
        rows = torch.arange(len(batch), device=states.device)
        residual[rows, last] = torch.stack([item.witness for item in batch]).to(residual.dtype)
        hidden = AdaptedHead(model, head, adapter).hidden(states, residual)[rows, last]
        logits = model.project(hidden.unsqueeze(1))[:, 0].float()
        return logits[:, a_id] - logits[:, b_id]

    return margins


def bce_loss_fn(model: HydraTransformer, head: int, a_id: int, b_id: int):
    margins = margin_fn(model, head, a_id, b_id)

    def loss_fn(adapter: HeadAdapter, batch: Sequence[UncertaintyItem]) -> tuple[torch.Tensor, int]:
        labels = torch.tensor([item.label for item in batch], device=model.device)
        return F.binary_cross_entropy_with_logits(margins(adapter, batch), labels, reduction="sum"), len(batch)

    return loss_fn


def predict(model: HydraTransformer, head: int, adapter: HeadAdapter | None, items, a_id: int, b_id: int, batch=16):
    margins = margin_fn(model, head, a_id, b_id)
    probs: list[float] = []
    with torch.no_grad():
        for start in range(0, len(items), batch):
            probs.extend(torch.sigmoid(margins(adapter, items[start : start + batch])).tolist())
    return probs


def with_uncertainty_head(model: HydraTransformer, init_from: int = 0) -> HydraTransformer:
    """The model with one more head, last, a copy of text head ``init_from``, marked as the uncertainty head.
    A model that already has an uncertainty head is returned as is (its head is trained further)."""
    if model.uncertainty_head is not None:
        return model
    if not 0 <= init_from < model.n_heads:
        raise ValueError(f"--init-from {init_from} is not a head of this {model.n_heads}-head model")
    config = HydraTransformerConfig(
        model.base_config, model.n_heads + 1, model.config.trunk_layers, model.config.head_layers
    )
    bigger = config.build(init_device="meta").to_empty(device=model.device).to(model.dtype)
    bigger.reset_rope()
    state = model.state_dict()
    for name, tensor in list(state.items()):
        if name.startswith("heads."):  # stacked per-head weights: append a copy of one head
            state[name] = torch.cat([tensor, tensor[init_from : init_from + 1]])
    bigger.load_state_dict(state)
    bigger.uncertainty_head = model.n_heads
    return bigger.eval()


def split_questions(questions: Sequence[MCQ], eval_fraction: float, seed: int) -> tuple[list[MCQ], list[MCQ]]:
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval fraction must be between 0 and 1, got {eval_fraction}")
    order = list(questions)
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction))
    if len(order) - n_eval < 1:
        raise ValueError(f"{len(order)} questions are too few to hold out {eval_fraction:.0%} for calibration")
    return order[n_eval:], order[:n_eval]


def train_uncertainty(
    model: HydraTransformer,
    tokenizer: Any,
    questions: Sequence[MCQ],
    config: TrainConfig,
    out: str | Path,
    *,
    eval_fraction: float = 0.25,
    mode: str = "poe",
    veto_threshold: float | None = None,
    init_from: int = 0,
    base_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the labelled set, train the uncertainty head, measure calibration, save everything to ``out``."""
    started = time.perf_counter()
    out = Path(out)
    work = prepare_output(out)
    train_q, eval_q = split_questions(questions, eval_fraction, config.seed)
    model = with_uncertainty_head(model, init_from)
    head = model.uncertainty_head
    assert head is not None
    answered = {}
    for name, qs in (("train", train_q), ("eval", eval_q)):
        answers, abstained = answer_questions(
            model, tokenizer, qs, mode=mode, veto_threshold=veto_threshold, seed=config.seed, progress=progress
        )
        if not answers:
            raise ValueError(f"the jury abstained on every {name} question; nothing to learn from")
        answered[name] = (answers, abstained)
    a_id, b_id = answer_logit_ids(tokenizer)
    train_items = uncertainty_items(model, tokenizer, answered["train"][0], progress)
    eval_items = uncertainty_items(model, tokenizer, answered["eval"][0], progress)
    labels_eval = [int(item.label) for item in eval_items]
    before = calibration_report(predict(model, head, None, eval_items, a_id, b_id), labels_eval)
    loss_fn = bce_loss_fn(model, head, a_id, b_id)
    loss_before = evaluate(loss_fn, new_adapter(model, head, config), train_items, config.batch_size)
    result = train_adapter(
        model,
        head,
        train_items,
        loss_fn,
        config,
        checkpoint=work / "uncertainty.ckpt",
        fingerprint={"questions": [q.question for q in train_q]},
        progress=progress,
        desc=f"uncertainty head ({len(train_items)} answers)",
    )
    after = calibration_report(predict(model, head, result.adapter, eval_items, a_id, b_id), labels_eval)
    merge_lora(model, head, result.adapter.to_lora_adapter())
    report = {
        "base_model": base_name,
        "uncertainty_head": head,
        "decoder": {"mode": mode, "veto_threshold": veto_threshold, "temperature": 0.0},
        "questions": {"train": len(train_q), "eval": len(eval_q)},
        "answers": {
            name: {
                "answered": len(a),
                "abstained": n_abst,
                "correct": sum(x.correct for x in a),
                "first_token_resampled": sum(x.resampled for x in a),
            }
            for name, (a, n_abst) in answered.items()
        },
        "config": config.to_dict(),
        "train_loss": {
            "before": loss_before,
            "after": evaluate(loss_fn, result.adapter, train_items, config.batch_size),
        },
        "calibration_before": before,
        "calibration_after": after,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    save_trained_ensemble(model, tokenizer, out, [], report, uncertainty_adapter=result.adapter)
    (out / "calibration.json").write_text(json.dumps(report, indent=2))
    plot_reliability(
        {"before training": before, "after training": after},
        out / "reliability.png",
        title=f"Uncertainty head, {len(eval_items)} held-out answers",
    )
    return report
