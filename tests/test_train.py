"""Training the jury: shards, the per-head adapter, the training loop, checkpoints, saving (tiny random models)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from olmo_tap import HydraTransformer
from olmo_tap.cli import main as cli_main
from olmo_tap.jsonl import write_jsonl
from olmo_tap.train.adapter import AdaptedHead, HeadAdapter, check_targets
from olmo_tap.train.data import (
    ChatExample,
    encode_example,
    read_chat_examples,
    shard_examples,
)
from olmo_tap.train.lora_heads import lm_items, lm_loss_fn, train_head_on_examples, train_heads
from olmo_tap.train.trainer import TrainConfig, new_adapter, train_adapter
from olmo_tap.weights.ensemble import load_ensemble
from olmo_tap.weights.lora import load_lora, merge_lora
from tests.tiny import LETTERS, LetterTokenizer, tiny_hydra

pytestmark = pytest.mark.usefixtures("one_thread")


class SavingLetterTokenizer(LetterTokenizer):
    """The letter tokenizer with an end of text ('z') and a no-op save (ensembles save their tokenizer)."""

    def __init__(self) -> None:
        super().__init__(26, eos_token_id=25)

    def save_pretrained(self, directory: str) -> None:
        pass


def letter_examples(n: int, seed: int = 0) -> list[ChatExample]:
    """Prompts of random letters; the reply is the prompt's first three letters reversed, then 'z'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice(LETTERS[:20]) for _ in range(rng.randint(4, 9)))
        out.append(ChatExample.from_prompt(prompt, prompt[:3][::-1]))
    return out


# ----- data ---------------------------------------------------------------------------------------------------


def test_shards_are_disjoint_complete_and_stable_under_reordering():
    examples = letter_examples(200)
    shards = shard_examples(examples, 4)
    keys = [e.key for shard in shards for e in shard]
    assert sorted(keys) == sorted(e.key for e in examples)  # every example in exactly one shard
    assert all(len(shard) > 20 for shard in shards)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    assert shard_examples(shuffled, 4) == shards  # same shards, same order inside them
    # An example's shard does not depend on the other examples.
    subset = shard_examples(shuffled[:50], 4)
    where = {e.key: i for i, shard in enumerate(shards) for e in shard}
    assert all(where[e.key] == i for i, shard in enumerate(subset) for e in shard)


def test_bad_data_gets_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        read_chat_examples(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        read_chat_examples(broken)
    cases = [
        ('{"text": "hello"}', "expected 'messages'"),
        ('{"prompt": "a", "response": ""}', "'response' must be a non-empty string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', r"messages\[0\]"),
        ("[1, 2]", "expected a JSON object"),
    ]
    for line, message in cases:
        path = tmp_path / "case.jsonl"
        path.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"case\.jsonl:2: .*{message}"):
            read_chat_examples(path)
    with pytest.raises(ValueError, match="does not exist"):
        read_chat_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"more shards \(5\) than examples \(3\)"):
        shard_examples(letter_examples(3), 5)


def test_unknown_targets_are_refused():
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1)  # 2 layers: layer 0 trunk, layer 1 heads
    with pytest.raises(ValueError, match=r"unknown LoRA target module\(s\) \['mlp'\]"):
        check_targets(model, ["mlp"], None)
    with pytest.raises(ValueError, match=r"unknown target layer\(s\) \[0\].*shared trunk"):
        check_targets(model, ["gate_proj"], [0])
    with pytest.raises(ValueError, match=r"unknown target layer\(s\) \[7\]"):
        check_targets(model, ["gate_proj"], [7])
    assert check_targets(model, ["down_proj", "q_proj"], None) == (("down_proj", "q_proj"), (1,))


def test_cli_reports_bad_data_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    code = cli_main(["train", "heads", "--data", str(bad), "--out", str(tmp_path / "out"), "--model", "/nonexistent"])
    assert code == 2
    assert "bad.jsonl:1: 'response' must be a non-empty string" in capsys.readouterr().err


def test_encoding_targets_the_reply_and_its_end_of_text():
    tokenizer = SavingLetterTokenizer()
    encoded = encode_example(tokenizer, ChatExample.from_prompt("abcd", "xy"))
    assert list(encoded.ids) == tokenizer.encode("abcd") + tokenizer.encode("xy") + [25]
    assert encoded.n_prompt == 4
    with pytest.raises(ValueError, match="more than the model's context"):
        encode_example(tokenizer, ChatExample.from_prompt("abcd" * 10, "xy"), max_tokens=16)


# ----- the adapter --------------------------------------------------------------------------------------------


def random_adapter(model, head, modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"), seed=3):
    config = TrainConfig(rank=4, alpha=8.0, target_modules=modules, seed=seed)
    adapter = new_adapter(model, head, config)
    with torch.no_grad():
        for name, p in adapter.lora.named_parameters():
            if name.endswith("_B"):
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(seed))
    return adapter


def test_adapted_head_equals_the_merged_head(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    adapter = random_adapter(model, 1)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trunk = model.forward_trunk(ids)
        plain = AdaptedHead(model, 1, None).hidden(trunk)
        torch.testing.assert_close(plain, model.head_hidden_states(trunk, [1])[0], atol=0, rtol=0)
        adapted = AdaptedHead(model, 1, adapter).hidden(trunk)
        merge_lora(model, 1, adapter.to_lora_adapter())
        merged = model.head_hidden_states(trunk, [1])[0]
    assert not torch.allclose(adapted, plain, atol=1e-3)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)


def test_saved_adapter_loads_in_peft_and_in_our_merge(tmp_path):
    from peft import PeftModel

    from tests.conftest import tiny_hf_model

    base_dir = tmp_path / "base"
    tiny_hf_model("llama", seed=5).save_pretrained(base_dir)
    model = HydraTransformer.from_pretrained(base_dir, n_heads=2, heads_depth=2, progress=False)
    adapter = random_adapter(model, 0, modules=("k_proj", "o_proj", "up_proj", "down_proj"))
    adapter.save(tmp_path / "adapter", base_model=str(base_dir))
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(1))
    peft_model = PeftModel.from_pretrained(tiny_hf_model("llama", seed=5), tmp_path / "adapter").eval()
    ensemble = load_ensemble(base_dir, adapters=[tmp_path / "adapter", None], heads_depth=2)
    with torch.no_grad():
        reference = peft_model(ids).logits[0]
        ours = ensemble(ids)[0, 0]
        trunk = model.forward_trunk(ids)
        live = model.project(AdaptedHead(model, 0, adapter).hidden(trunk))[0]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(live, reference, atol=1e-4, rtol=0)
    reloaded = HeadAdapter.from_lora(model.base_config, load_lora(tmp_path / "adapter"))
    for name, p in adapter.lora.items():
        assert torch.equal(p, reloaded.lora[name]), name


# ----- training -----------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_changes_only_the_adapted_head():
    model = tiny_hydra(vocab=26, n_heads=3, heads_depth=1)
    tokenizer = SavingLetterTokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(rank=4, alpha=8.0, lr=1e-2, epochs=6, batch_size=8)
    result, stats = train_head_on_examples(model, tokenizer, 1, letter_examples(32), config, progress=False)
    assert stats["loss_after"] < 0.8 * stats["loss_before"]
    for name, tensor in model.state_dict().items():  # training itself writes nothing into the model
        assert torch.equal(tensor, before[name]), name
    merge_lora(model, 1, result.adapter.to_lora_adapter())
    for name, tensor in model.state_dict().items():
        if name.startswith("heads.") and name.split(".")[-1] in ("w13", "w2"):
            assert not torch.equal(tensor[1], before[name][1]), name  # the adapted linears of head 1 moved
            for other in (0, 2):
                assert torch.equal(tensor[other], before[name][other]), (name, other)
        else:
            assert torch.equal(tensor, before[name]), name  # trunk, attention, norms, lm_head, embedding


def test_train_heads_saves_an_ensemble_that_reloads_with_identical_logits(tmp_path):
    model = tiny_hydra(vocab=26, n_heads=3, heads_depth=1)
    tokenizer = SavingLetterTokenizer()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(rank=4, alpha=8.0, lr=1e-2, epochs=2, batch_size=8, target_layers=(1,))
    report = train_heads(model, tokenizer, letter_examples(60), config, tmp_path / "jury", progress=False)
    assert sum(report["shard_sizes"]) == 60
    assert all(h["loss_after"] < h["loss_before"] for h in report["heads"])
    assert torch.equal(model.embed.weight, original["embed.weight"])
    assert all(not torch.equal(model.heads[0].w2[h], original["heads.0.w2"][h]) for h in range(3))
    again = HydraTransformer.from_pretrained(tmp_path / "jury", progress=False)
    ids = torch.randint(0, 26, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert json.loads((tmp_path / "jury" / "training.json").read_text())["shard_sizes"] == report["shard_sizes"]
    assert sorted(p.name for p in (tmp_path / "jury" / "adapters").iterdir()) == ["head0", "head1", "head2"]
    assert not (tmp_path / "jury" / ".training").exists()
    with pytest.raises(ValueError, match="2 shards for 3 text heads"):
        train_heads(tiny_hydra(vocab=26, n_heads=3), tokenizer, letter_examples(20), config, tmp_path / "x", n_shards=2)


class Interrupt(Exception):
    pass


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    model = tiny_hydra(vocab=26, n_heads=2, heads_depth=1)
    tokenizer = SavingLetterTokenizer()
    encoded = [encode_example(tokenizer, e) for e in letter_examples(20)]
    items = lm_items(model, encoded, progress=False)
    loss_fn = lm_loss_fn(model, 0, 26)
    config = TrainConfig(rank=4, alpha=8.0, lr=5e-3, epochs=3, batch_size=6, checkpoint_every=2, seed=4)
    whole = train_adapter(model, 0, items, loss_fn, config, progress=False)
    assert whole.completed and whole.steps == 12

    calls = {"n": 0}

    def crashing(adapter, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # the 8th step dies: the checkpoint holds step 6
            raise Interrupt
        return loss_fn(adapter, batch)

    checkpoint = tmp_path / "head0.ckpt"
    with pytest.raises(Interrupt):
        train_adapter(model, 0, items, crashing, config, checkpoint=checkpoint, progress=False)
    resumed = train_adapter(model, 0, items, loss_fn, config, checkpoint=checkpoint, progress=False)
    assert resumed.resumed_from == 6 and resumed.completed
    assert resumed.losses == whole.losses
    for name, p in whole.adapter.state_dict().items():
        assert torch.equal(p, resumed.adapter.state_dict()[name]), name
    with pytest.raises(ValueError, match="different run"):
        train_adapter(model, 0, items[:10], loss_fn, config, checkpoint=checkpoint, progress=False)


def test_jsonl_round_trip(tmp_path):
    records = [{"prompt": "héllo", "response": "wörld"}, {"messages": [{"role": "user", "content": "a"}]}]
    write_jsonl(tmp_path / "x.jsonl", records[:1])
    assert read_chat_examples(tmp_path / "x.jsonl")[0].messages == (("user", "héllo"), ("assistant", "wörld"))
