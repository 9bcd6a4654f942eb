"""Robustness post-training (``olmo-tap train robustness``): the objective, training, saving and stacking, resuming,
errors (tiny random models and tiny banks)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import olmo_tap.train.robustness as rt
from olmo_tap.cli import main as cli_main
from olmo_tap.inference.prompts import encode_chat
from olmo_tap.robustness.bank import AttackBank, BankEntry, BankError, model_fingerprint
from olmo_tap.robustness.gcg import attacked_text, question_digest
from olmo_tap.train.adapter import HeadAdapter
from olmo_tap.train.mcq import format_mcq, generate_mcqs
from olmo_tap.train.trainer import TrainConfig, new_adapter, train_adapter
from olmo_tap.weights.ensemble import load_ensemble
from olmo_tap.weights.lora import load_lora
from olmo_tap.weights.tokenizer import vocab_limit
from tests.conftest import tiny_hf_model  # here, not in a test: importing it sets torch's threads (to 2)
from tests.tiny import LetterTokenizer, tiny_hydra

pytestmark = pytest.mark.usefixtures("one_thread")

# The clean prompts end in "n" (the instruction's "option"): a suffix ending in "n" flips a tiny model less often.
SUFFIXES = ["xqz", "vvon", "zzyx", "kwq"]


def tiny_bank(suffixes=SUFFIXES, fingerprint="sha256:tiny", questions=()) -> AttackBank:
    entries = [
        BankEntry(i, s, [], "jury", list(questions) if i == 0 else [], 1, 1, 0.0, 1, 0.0, i)
        for i, s in enumerate(suffixes)
    ]
    return AttackBank("tiny", fingerprint, {}, entries)


def questions(n: int, seed: int = 3):
    # Short kinds only: the letter tokenizer's prompts must fit the tiny model's 128 positions.
    return generate_mcqs(n, seed=seed, kinds=("arithmetic", "comparison"))


def tiny_config(**overrides) -> TrainConfig:
    settings = {"rank": 4, "alpha": 8.0, "lr": 2e-2, "epochs": 3, "batch_size": 8, "seed": 1, **overrides}
    return TrainConfig(**settings)


def last_logits(model, head: int, ids: list[int]) -> torch.Tensor:
    """Head ``head``'s logits at the last position of ``ids``: the model's own forward, no cached trunk states."""
    with torch.no_grad():
        return model(torch.tensor([ids]), head_indices=[head], last_token_only=True)[0, 0, -1]


# ----- the objective ----------------------------------------------------------------------------------------------


def test_the_loss_is_kl_clean_to_attacked_over_the_flipped_pairs_only():
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1, seed=2)
    tokenizer = LetterTokenizer(26)
    qs = questions(6)
    items = rt.pair_items(model, tokenizer, qs, SUFFIXES[:3], progress=False)
    pairs = rt.kl_and_flips(model, 1, 26)
    adapter = new_adapter(model, 1, tiny_config())
    loss_fn = rt.robustness_loss_fn(pairs, batch_size=32)
    loss, count = loss_fn(adapter, items)
    # Independently: the whole model's forward on the token ids, KL by torch's kl_div over the flipped pairs.
    clean = torch.stack([last_logits(model, 1, encode_chat(tokenizer, format_mcq(q))) for q in qs for _ in range(3)])
    attacked = torch.stack(
        [
            last_logits(model, 1, encode_chat(tokenizer, attacked_text(format_mcq(q), s)))
            for q in qs
            for s in SUFFIXES[:3]
        ]
    )
    flipped = clean.argmax(-1) != attacked.argmax(-1)
    assert 0 < int(flipped.sum()) < len(items)  # both kinds present, so leaving one out would show
    expected = F.kl_div(F.log_softmax(attacked[flipped], -1), F.softmax(clean[flipped], -1), reduction="sum")
    everything = F.kl_div(F.log_softmax(attacked, -1), F.softmax(clean, -1), reduction="sum")
    assert count == 32  # normalised by the fixed batch size, not by the pairs that flipped
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert float(everything) > float(expected) + 1e-3  # the unflipped pairs' KL is not zero, and is left out
    _, flips = pairs(adapter, items)
    assert torch.equal(flips, flipped)
    # Gradients reach the adapter through the attacked pass.
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    # A batch where nothing flips has no targets (the trainer then makes no update).
    same = [rt.Pair(items[0].clean, items[0].clean)]
    assert loss_fn(adapter, same)[1] == 0


def test_a_stagnant_run_stops_early_without_moving_and_resumes_as_stopped(tmp_path):
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1)
    items = list(range(40))
    config = tiny_config(epochs=2, checkpoint_every=50)

    def nothing_flips(adapter, batch):
        return torch.zeros(()), 0

    ckpt = tmp_path / "h.ckpt"
    result = train_adapter(model, 0, items, nothing_flips, config, checkpoint=ckpt, early_stop=rt.stagnated(3),
                           progress=False)  # fmt: skip
    assert result.steps == 3 and result.stopped_early and result.completed and result.losses == [0.0] * 3
    assert all(not p.abs().sum() for n, p in result.adapter.lora.items() if n.endswith("_B"))  # no update at all
    again = train_adapter(model, 0, items, nothing_flips, config, checkpoint=ckpt, early_stop=rt.stagnated(3),
                          progress=False)  # fmt: skip
    assert again.steps == 3 and again.stopped_early and again.resumed_from == 3


# ----- training, saving, stacking ---------------------------------------------------------------------------------


def test_training_lowers_the_kl_on_its_pairs_and_leaves_the_model_alone(tmp_path):
    model = tiny_hydra(vocab=26, n_heads=3, heads_depth=1, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = tiny_bank()
    report = rt.train_robustness(
        model, LetterTokenizer(26), bank, questions(30), tiny_config(), tmp_path / "rob", patience=50, progress=False
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert [e["index"] for e in report["suffixes"]["held_out"]] == [3]  # index % 4 == 3
    assert [e["suffix"] for e in report["suffixes"]["trained"]] == SUFFIXES[:3]
    assert sum(report["questions"]["shard_sizes"]) == 30 and len(report["heads"]) == 3
    for h in report["heads"]:
        assert h["pairs"] == 3 * report["questions"]["shard_sizes"][h["head"]]
        assert h["flipped_before"] > 0 and h["updates"] > 0
        assert h["loss_after"] < 0.7 * h["loss_before"], h
        assert h["flipped_after"] < h["flipped_before"], h
    saved = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert saved["bank"]["fingerprint"] == "sha256:tiny" and saved["heads"] == report["heads"]
    assert not (tmp_path / "rob" / ".training").exists()


def test_questions_a_suffix_was_optimised_on_are_dropped_and_shards_follow_the_security_rule():
    qs = questions(20)
    bank = tiny_bank(questions=[question_digest(q) for q in qs[:5]])
    kept = [q for q in qs if question_digest(q) not in rt.bank_questions(bank)]
    assert len(kept) == 15
    shards = rt.shard_questions(kept, 3)
    from olmo_tap.train.data import shard_examples
    from olmo_tap.train.mcq import mcq_example

    security = shard_examples([mcq_example(q) for q in kept], 3)
    assert [[mcq_example(q).key for q in s] for s in shards] == [[e.key for e in s] for s in security]


def test_saved_adapters_load_back_and_stack_on_the_security_adapter(tmp_path):
    base = tmp_path / "base"
    tiny_hf_model("llama", seed=6).save_pretrained(base)
    plain = load_ensemble(base, [None, None], heads_depth=2)
    # A "security" adapter for head 0, saved in PEFT's layout, then the model as the command loads it: merged.
    security = new_adapter(plain, 0, tiny_config(seed=9))
    with torch.no_grad():
        for name, p in security.lora.items():
            if name.endswith("_B"):
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    security.save(tmp_path / "security")
    model = load_ensemble(base, [tmp_path / "security", None], heads_depth=2)
    tokenizer = LetterTokenizer(26)
    config = tiny_config(epochs=1, target_modules=("up_proj", "down_proj"))
    rt.train_robustness(model, tokenizer, tiny_bank(), questions(12), config, tmp_path / "rob", progress=False)
    robust = [load_lora(tmp_path / "rob" / f"head{h}") for h in (0, 1)]
    stacked = load_ensemble(base, [[tmp_path / "security", tmp_path / "rob" / "head0"], tmp_path / "rob" / "head1"],
                            heads_depth=2)  # fmt: skip
    sec = load_lora(tmp_path / "security")
    first = plain.config.trunk_layers
    for layer in range(first, plain.base_config.n_layers):
        block, ref = stacked.heads[layer - first], plain.heads[layer - first]
        up, down = slice(plain.base_config.ffn_hidden, None), slice(None)
        for fused, name, cols in (("w13", "up_proj", up), ("w2", "down_proj", down)):
            for head, deltas in ((0, [sec, robust[0]]), (1, [robust[1]])):
                expected = getattr(ref, fused)[head][:, cols].clone()
                for adapter in deltas:
                    expected += adapter.delta(layer, name).t()
                torch.testing.assert_close(getattr(block, fused)[head][:, cols], expected, atol=1e-6, rtol=1e-6)
        gate = block.w13[0][:, : plain.base_config.ffn_hidden]
        torch.testing.assert_close(gate, plain.heads[layer - first].w13[0][:, : plain.base_config.ffn_hidden]
                                   + sec.delta(layer, "gate_proj").t(), atol=1e-6, rtol=1e-6)  # fmt: skip
    # The saved adapter is the trained one: reloading gives the same logits as the adapter in training.
    reloaded = HeadAdapter.from_lora(model.base_config, robust[0])
    item = rt.pair_items(model, tokenizer, questions(1), ["xqz"], progress=False)[0]
    vocab = vocab_limit(tokenizer, model.base_config.vocab_size)
    with torch.no_grad():
        live = rt.answer_logits(model, 0, reloaded, [item.attacked], vocab)[0]
        ids = encode_chat(tokenizer, attacked_text(format_mcq(questions(1)[0]), "xqz"))
        torch.testing.assert_close(last_logits(stacked, 0, ids)[:vocab], live, atol=1e-4, rtol=1e-4)


class Interrupt(Exception):
    pass


def test_same_seed_same_bytes_and_an_interrupted_run_resumes_to_them(tmp_path, monkeypatch):
    tokenizer = LetterTokenizer(26)
    config = tiny_config(epochs=2, checkpoint_every=1)
    args = (tiny_bank(), questions(16), config)
    rt.train_robustness(tiny_hydra(vocab=26, n_heads=2), tokenizer, *args, tmp_path / "a", progress=False)
    rt.train_robustness(tiny_hydra(vocab=26, n_heads=2), tokenizer, *args, tmp_path / "b", progress=False)
    real = rt.robustness_loss_fn
    calls = {"n": 0}

    def crashing(pairs, batch_size):
        loss_fn = real(pairs, batch_size)

        def fn(adapter, batch):
            calls["n"] += 1
            if calls["n"] == 5:  # head 0 dies in its 5th step: its checkpoint holds step 4
                raise Interrupt
            return loss_fn(adapter, batch)

        return fn

    monkeypatch.setattr(rt, "robustness_loss_fn", crashing)
    with pytest.raises(Interrupt):
        rt.train_robustness(tiny_hydra(vocab=26, n_heads=2), tokenizer, *args, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / ".training" / "head0.ckpt").is_file()
    monkeypatch.setattr(rt, "robustness_loss_fn", real)
    rt.train_robustness(tiny_hydra(vocab=26, n_heads=2), tokenizer, *args, tmp_path / "c", progress=False)
    for head in (0, 1):
        files = [(tmp_path / run / f"head{head}" / "adapter_model.safetensors").read_bytes() for run in "abc"]
        assert files[0] == files[1] == files[2], head
    # A finished run is reused, not retrained.
    again = rt.train_robustness(tiny_hydra(vocab=26, n_heads=2), tokenizer, *args, tmp_path / "c", progress=False)
    assert again["reused_heads"] == [0, 1]


# ----- errors -----------------------------------------------------------------------------------------------------


def test_bank_errors_are_clear(tmp_path, capsys):
    with pytest.raises(BankError, match="holds no suffixes"):
        rt.split_suffixes(AttackBank("m", "sha256:x", {}, []))
    with pytest.raises(BankError, match="every entry"):
        rt.split_suffixes(AttackBank("m", "sha256:x", {}, tiny_bank().entries[3:]))
    assert [e.index for e in rt.split_suffixes(tiny_bank(), 0).trained] == [0, 1, 2, 3]
    # A bank for other weights: a warning that names both fingerprints, and training goes on.
    model = tiny_hydra(vocab=26, n_heads=2)
    rt.train_robustness(model, LetterTokenizer(26), tiny_bank(fingerprint="sha256:other"), questions(8),
                        tiny_config(epochs=1), tmp_path / "r", progress=False)  # fmt: skip
    err = capsys.readouterr().err
    assert "warning" in err and "sha256:other" in err and model_fingerprint(model) in err


def test_cli_refuses_a_missing_or_empty_bank_before_loading_a_model(tmp_path, capsys):
    argv = ["train", "robustness", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")]
    assert cli_main([*argv, "--bank", str(tmp_path / "missing.json")]) == 2
    assert "no attack bank at" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(tiny_bank().to_dict() | {"entries": []}))
    assert cli_main([*argv, "--bank", str(empty)]) == 2
    assert "holds no suffixes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_margin_is_two_points_of_clean_accuracy_for_every_decoder():
    from olmo_tap.benchmarks.robustness_training import margin

    before = {"jury": {"clean_accuracy": 0.5}, "head:0": {"clean_accuracy": 0.4}}
    met = margin(before, {"jury": {"clean_accuracy": 0.48}, "head:0": {"clean_accuracy": 0.45}}, ["jury", "head:0"])
    assert met["met"] and met["worst_decoder"] == "jury"
    missed = margin(before, {"jury": {"clean_accuracy": 0.5}, "head:0": {"clean_accuracy": 0.375}}, ["jury", "head:0"])
    assert not missed["met"] and missed["worst_decoder"] == "head:0" and missed["drops"]["head:0"] == 0.025
