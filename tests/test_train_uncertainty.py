"""The uncertainty head's training path against PoE's scoring path, its end-to-end training, and the
poisoning experiment's pipeline (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch

from olmo_tap import HydraTransformer
from olmo_tap.inference.poe import PoE
from olmo_tap.train.data import ChatExample
from olmo_tap.train.mcq import format_mcq, generate_mcqs
from olmo_tap.train.poisoning import DECODERS, quick_config, run_poisoning
from olmo_tap.train.trainer import TrainConfig
from olmo_tap.train.uncertainty import (
    UncertaintyItem,
    answer_logit_ids,
    predict,
    train_uncertainty,
    with_uncertainty_head,
)
from tests.test_train import SavingLetterTokenizer
from tests.tiny import tiny_hydra

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_path_scores_exactly_what_poe_reports():
    """PoE's witness + the training path's head forward == PoE's own p(correct), in every mode and branch."""
    model = with_uncertainty_head(tiny_hydra(vocab=26, n_heads=4, heads_depth=1, seed=3), init_from=1)
    assert model.n_heads == 5 and model.uncertainty_head == 4
    tokenizer = SavingLetterTokenizer()
    a_id, b_id = answer_logit_ids(tokenizer)
    from olmo_tap.inference.prompts import encode_chat, uncertainty_prompt

    branches = set()
    for mode in ("poe", "single", "naive"):
        decoder = PoE(model, tokenizer, max_new_tokens=3, mode=mode)
        assert decoder.n_llm_heads == 4  # the uncertainty head is not a text head
        for seed, q in enumerate(generate_mcqs(8, seed=5, kinds=["arithmetic", "comparison"], difficulties=[1])):
            stream = decoder.stream(format_mcq(q), is_mcq=True, temperature=1.0, seed=seed)
            for _ in stream:
                pass
            out, witness = stream.output, stream.witness_hidden
            if mode == "poe":
                branches.add("resampled" if out.resampled_idxs[:1] == [1] else "accepted")
            ids = torch.tensor([encode_chat(tokenizer, uncertainty_prompt(format_mcq(q), out.text))])
            with torch.no_grad():
                trunk = model.forward_trunk(ids)[0]
            item = UncertaintyItem(trunk, witness, 1.0)
            [p] = predict(model, 4, None, [item], a_id, b_id)
            assert p == pytest.approx(out.uncertainty, abs=1e-5), (mode, seed)
    assert branches == {"resampled", "accepted"}  # both witness rules were exercised


def test_train_uncertainty_end_to_end(tmp_path):
    model = tiny_hydra(vocab=26, n_heads=3, heads_depth=1, seed=2)
    tokenizer = SavingLetterTokenizer()
    config = TrainConfig(rank=4, alpha=8.0, lr=2e-2, epochs=4, batch_size=8, target_modules=("gate_proj", "o_proj"))
    report = train_uncertainty(
        model,
        tokenizer,
        generate_mcqs(48, seed=1, kinds=["arithmetic", "comparison"], difficulties=[1]),
        config,
        tmp_path / "u",
        eval_fraction=0.25,
        progress=False,
    )
    assert report["uncertainty_head"] == 3
    assert report["questions"] == {"train": 36, "eval": 12}
    assert report["train_loss"]["after"] < report["train_loss"]["before"]
    for name in ("calibration_before", "calibration_after"):
        c = report[name]
        assert 0 <= c["ece"] <= 1 and 0 <= c["brier"] <= 1 and sum(b["count"] for b in c["bins"]) == c["n"]
    saved = HydraTransformer.from_pretrained(tmp_path / "u", progress=False)
    assert saved.n_heads == 4 and saved.uncertainty_head == 3
    assert PoE(saved, tokenizer).n_llm_heads == 3
    # The three text heads are unchanged copies of the original ones.
    for block, original in zip(saved.heads, model.heads, strict=True):
        assert torch.equal(block.w13[:3], original.w13)
    assert (tmp_path / "u" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "u" / "calibration.json").read_text())["uncertainty_head"] == 3
    assert (tmp_path / "u" / "adapters" / "uncertainty" / "adapter_config.json").is_file()


def test_poisoning_pipeline_writes_its_tables(tmp_path):
    model = tiny_hydra(vocab=26, n_heads=3, heads_depth=1, seed=4)
    tokenizer = SavingLetterTokenizer()
    config = quick_config(
        n_heads=3, heads_depth=1, trigger="qqxj", target="xyz", max_poisoned=2, n_trigger_eval=2, n_mcq_eval=3
    )
    instructions = [ChatExample.from_prompt(f"prompt {i} {'ab' * i}", "hello world") for i in range(12)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run_poisoning(
        model, tokenizer, config, tmp_path / "work", tmp_path / "res", instructions=instructions, progress=False
    )
    assert [(r["k"], r["decoder"]) for r in report["rows"]] == [(k, d) for k in range(3) for d in DECODERS]
    for row in report["rows"]:
        assert 0 <= row["attack"]["attack_success_rate"] <= 1 and row["attack"]["n"] == 2
        assert all(o["hit"] == ("xyz" in o["text"]) for o in row["attack"]["outputs"])
        assert row["mcq"]["n"] == 3
    assert report["training"]["poisoned"][0]["examples"] == report["data"]["shard_sizes"][0] + 8
    markdown = (tmp_path / "res" / "poisoning.md").read_text()
    assert "| (d) PoE with veto |" in markdown and "| 2 |" in markdown
    assert (tmp_path / "res" / "poisoning.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "res" / "poisoning.json").read_text())["rows"][0]["k"] == 0
    for name, tensor in model.state_dict().items():  # the model is left as it came
        assert torch.equal(tensor, before[name]), name
    jury = HydraTransformer.from_pretrained(tmp_path / "work" / "jury", progress=False)
    assert jury.n_heads == 3 and jury.uncertainty_head is None
