"""Saved ensembles, per-head LoRA (against PEFT running the adapter unmerged), OLMo-core states."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from olmo_tap import HydraTransformer, HydraTransformerConfig, WeightsError, load_ensemble, save_ensemble
from olmo_tap.weights.hf import config_from_hf
from olmo_tap.weights.layout import tower_state
from olmo_tap.weights.olmo_core import olmo_core_to_hf


def test_saved_ensemble_reloads_bit_identical(tiny_checkpoint, tmp_path):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=3, heads_depth=2, progress=False)
    with torch.no_grad():
        for block in model.heads:
            block.wqkv.add_(torch.randn_like(block.wqkv) * 0.01)
    saved = save_ensemble(model, tmp_path / "ens", metadata={"note": "test"})
    again = HydraTransformer.from_pretrained(saved, progress=False)
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    with pytest.raises(WeightsError, match="saved ensemble has 3 heads"):
        HydraTransformer.from_pretrained(saved, n_heads=4, progress=False)


def test_tower_state_round_trips_the_checkpoint(tiny_checkpoint):
    _, directory, hf_model = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=2, progress=False)
    reference = hf_model.state_dict()
    for name, tensor in tower_state(model, head=1).items():
        assert torch.equal(tensor, reference[name]), name


def peft_adapter(hf_model, tmp_path, layers, seed):
    """A random LoRA on head layers, saved by PEFT itself (lora_B randomised: PEFT starts it at 0)."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        layers_to_transform=layers,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(hf_model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    out = tmp_path / f"adapter{seed}"
    peft_model.save_pretrained(out)
    return peft_model.eval(), out


def test_merged_lora_equals_peft_running_it_unmerged(tmp_path):
    from tests.conftest import tiny_hf_model

    base = tiny_hf_model("llama", seed=11)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(8))
    peft_model, adapter_dir = peft_adapter(tiny_hf_model("llama", seed=11), tmp_path, [2, 3], seed=1)
    with torch.no_grad():
        reference = peft_model(ids).logits[0]
        plain = base(ids).logits[0]
    model = load_ensemble(base_dir, adapters=[None, adapter_dir, None], heads_depth=2)
    with torch.no_grad():
        out = model(ids)[:, 0]
    torch.testing.assert_close(out[1], reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0], plain, atol=1e-4, rtol=0)  # other heads untouched
    torch.testing.assert_close(out[2], plain, atol=1e-4, rtol=0)
    assert (out[1] - plain).abs().max() > 1e-2  # the adapter really changed head 1


def test_lora_on_a_trunk_layer_is_refused(tmp_path):
    from tests.conftest import tiny_hf_model

    base = tiny_hf_model("llama", seed=12)
    base.save_pretrained(tmp_path / "base")
    _, adapter_dir = peft_adapter(tiny_hf_model("llama", seed=12), tmp_path, [0], seed=2)
    with pytest.raises(WeightsError, match="trunk is shared"):
        load_ensemble(tmp_path / "base", adapters=[adapter_dir, None], heads_depth=2)


def test_uncertainty_head_is_placed_last(tiny_checkpoint, tmp_path):
    _, directory, _ = tiny_checkpoint
    model = load_ensemble(directory, adapters=[None, None], uncertainty_adapter=None, heads_depth=1)
    assert model.n_heads == 2 and model.uncertainty_head is None
    save_ensemble(model, tmp_path / "e", uncertainty_head=True)
    assert HydraTransformer.from_pretrained(tmp_path / "e", progress=False).uncertainty_head == 1


def test_olmo_core_state_loads_like_the_hf_checkpoint():
    from tests.conftest import tiny_hf_model

    hf_model = tiny_hf_model("olmo2", seed=13)
    hf_state = hf_model.state_dict()
    olmo_state = {"embeddings.weight": hf_state["model.embed_tokens.weight"]}
    names = {
        "self_attn.q_proj": "attention.w_q",
        "self_attn.k_proj": "attention.w_k",
        "self_attn.v_proj": "attention.w_v",
        "self_attn.o_proj": "attention.w_out",
        "self_attn.q_norm": "attention.q_norm",
        "self_attn.k_norm": "attention.k_norm",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
        "post_attention_layernorm": "attention_norm",
        "post_feedforward_layernorm": "feed_forward_norm",
    }
    for i in range(4):
        for hf_name, core_name in names.items():
            olmo_state[f"blocks.{i}.{core_name}.weight"] = hf_state[f"model.layers.{i}.{hf_name}.weight"]
    olmo_state["lm_head.norm.weight"] = hf_state["model.norm.weight"]
    olmo_state["lm_head.w_out.weight"] = hf_state["lm_head.weight"]
    assert set(olmo_core_to_hf(olmo_state)) == set(hf_state)

    hydra_config = HydraTransformerConfig.split(config_from_hf(hf_model.config.to_dict()), 2, 2)
    model = hydra_config.build()
    HydraTransformer.load_olmo_state(model, olmo_state, trunk_layers=2, vocab_size=hf_model.config.vocab_size)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[1], hf_model(ids).logits, atol=1e-4, rtol=0)


# ----- bad input ------------------------------------------------------------------------------------------------


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory"):
        HydraTransformer.from_pretrained(tmp_path / "nope", progress=False)


def test_truncated_safetensors_is_reported(tiny_checkpoint, tmp_path):
    _, directory, _ = tiny_checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((directory / "config.json").read_text())
    data = (directory / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        HydraTransformer.from_pretrained(broken, progress=False)


def test_shapes_that_do_not_match_the_config_are_reported(tiny_checkpoint, tmp_path):
    _, directory, _ = tiny_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    save_file(load_file(directory / "model.safetensors"), bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="shape"):
        HydraTransformer.from_pretrained(bad, progress=False)


def test_unsupported_architecture_is_reported(tiny_checkpoint, tmp_path):
    _, directory, _ = tiny_checkpoint
    bad = tmp_path / "gpt2ish"
    bad.mkdir()
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="unsupported architecture"):
        HydraTransformer.from_pretrained(bad, progress=False)


@pytest.mark.parametrize(
    ("n_heads", "heads_depth", "message"),
    [(0, 2, "n_heads must be >= 1"), (2, 0, "heads_depth"), (2, 5, "heads_depth"), (-1, 1, "n_heads")],
)
def test_bad_hydra_shapes_are_reported(tiny_checkpoint, n_heads, heads_depth, message):
    _, directory, _ = tiny_checkpoint
    with pytest.raises(ValueError, match=message):
        HydraTransformer.from_pretrained(directory, n_heads=n_heads, heads_depth=heads_depth, progress=False)


def test_bad_tokens_heads_and_lengths_are_reported(tiny_checkpoint):
    _, directory, _ = tiny_checkpoint
    model = HydraTransformer.from_pretrained(directory, n_heads=2, heads_depth=1, progress=False)
    vocab = model.base_config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        model(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="token id -3"):
        model(torch.tensor([[-3]]))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"head indices \[2\] out of range"):
        model(torch.tensor([[1]]), head_indices=[0, 2])
    with pytest.raises(ValueError, match="head_indices is empty"):
        model(torch.tensor([[1]]), head_indices=[])
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="do not fit the KV cache of 8"):
        model(torch.ones(1, 9, dtype=torch.long), cache=cache)
    model(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="do not fit the KV cache of 8"):
        model(torch.ones(1, 3, dtype=torch.long), start_pos=6, cache=cache)
    with pytest.raises(ValueError, match="context of 256"):
        model.new_cache(1, 1000)
