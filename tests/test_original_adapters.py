"""The original system's adapter files (msc-ai-mmmjo/tap): read, stacked per head, converted to PEFT's layout.

The files are written the way the original wrote them: PEFT's ``get_peft_model`` on a head whose modules carry
OLMo-core's names (``blocks`` numbered from 0 inside the head, ``attention.w_q`` ..., ``feed_forward.w1/w2/w3``),
then ``torch.save`` of its state dict (slim exports keep only the ``lora_`` tensors). The reference is computed
without our loader: transformers' OLMo-2 with the same LoRA applied and merged by peft itself.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from olmo_tap import WeightsError, load_ensemble, load_original_ensemble
from olmo_tap.weights.lora import LoraAdapter, load_lora
from olmo_tap.weights.original import (
    export_original_weights,
    find_original_weights,
    original_to_peft,
    read_original_adapter,
)
from tests.conftest import tiny_hf_model

N_LAYERS, DEPTH = 4, 2
TRUNK = N_LAYERS - DEPTH
N_TEXT = 2
FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
SECURITY_RANK, ROBUSTNESS_RANK, UNCERTAINTY_RANK = 4, 8, 6
IDS = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(3))

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- the original's layout, written by PEFT ------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        for name in ("w_q", "w_k", "w_v", "w_out"):
            setattr(self, name, nn.Linear(d, d, bias=False))
        self.q_norm, self.k_norm = nn.RMSNorm(d), nn.RMSNorm(d)


class _FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)


class _Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.attention, self.attention_norm = _Attention(d), nn.RMSNorm(d)
        self.feed_forward, self.feed_forward_norm = _FeedForward(d, hidden), nn.RMSNorm(d)


class _OlmoCoreHead(nn.Module):
    """The original's head: an OLMo-core Transformer without embeddings or lm_head (names only matter)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        c = hf_model.config
        self.blocks = nn.ModuleDict({str(b): _Block(c.hidden_size, c.intermediate_size) for b in range(DEPTH)})
        hf = hf_model.state_dict()
        pairs = {
            "attention.w_q": "self_attn.q_proj",
            "attention.w_k": "self_attn.k_proj",
            "attention.w_v": "self_attn.v_proj",
            "attention.w_out": "self_attn.o_proj",
            "attention.q_norm": "self_attn.q_norm",
            "attention.k_norm": "self_attn.k_norm",
            "attention_norm": "post_attention_layernorm",
            "feed_forward_norm": "post_feedforward_layernorm",
            **{f"feed_forward.{k}": f"mlp.{v}" for k, v in FFN.items()},
        }
        with torch.no_grad():
            for b in range(DEPTH):
                for core, hf_name in pairs.items():
                    self.get_parameter(f"blocks.{b}.{core}.weight").copy_(
                        hf[f"model.layers.{TRUNK + b}.{hf_name}.weight"]
                    )


class _Evil:
    """Anything torch.load(weights_only=True) must not unpickle."""


def _train(head: nn.Module, rank: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The original's inject_lora, then 'training': random LoRA values (lora_B too) and one optimizer step."""
    peft = get_peft_model(head, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(FFN)))
    gen = torch.Generator().manual_seed(seed)
    lora = [p for n, p in peft.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    for p in lora:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return peft, optimizer


def _slim(peft: nn.Module) -> dict[str, torch.Tensor]:
    """The original's extract_lora_state."""
    return {k: v.detach().clone() for k, v in peft.state_dict().items() if "lora_" in k}


def _fat(peft: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "head_state_dict": {k: v.detach().clone() for k, v in peft.state_dict().items()},
        "optimizer_state_dict": optimizer.state_dict(),
        "global_step": 7,
    }


def _manifest(directory: Path, rank: int, base_model: str | None = None, **config) -> None:
    config = {"model_size": "tiny", "lora_r": rank, "lora_alpha": 2 * rank, "heads_depth": DEPTH, **config}
    manifest = {"description": "test", "base_model": base_model, "config": config}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny OLMo-2 base and the original's weights directory for it: 2 heads of security (slim, r=4, manifest)
    then robustness (fat with optimizer state, r=8, no manifest, trained on base + security as in the original),
    and an uncertainty head (fat, wrapped, r=6, manifest). Returns the paths and every file's slim state."""
    root = tmp_path_factory.mktemp("original")
    base_hf = tiny_hf_model("olmo2", seed=21, num_hidden_layers=N_LAYERS)
    base_dir = root / "base"
    base_hf.save_pretrained(base_dir)
    weights = root / "weights"
    for sub in ("prod", "robustness", "uncertainty"):
        (weights / sub).mkdir(parents=True)
    _manifest(weights / "prod", SECURITY_RANK, num_shards=N_TEXT, target_modules=list(FFN), base_model=str(base_dir))
    _manifest(weights / "uncertainty", UNCERTAINTY_RANK, num_shards=N_TEXT + 1, target_modules=list(FFN))
    stacks = []
    for shard in range(N_TEXT):
        security, _ = _train(_OlmoCoreHead(base_hf), SECURITY_RANK, seed=100 + shard)
        security_state = _slim(security)  # before merging: the next LoRA is injected into the same modules
        torch.save(security_state, weights / "prod" / f"shard_{shard}_lora.pt")
        robustness, optimizer = _train(security.merge_and_unload(), ROBUSTNESS_RANK, seed=200 + shard)
        torch.save(_fat(robustness, optimizer), weights / "robustness" / f"shard_{shard}_lora.pt")
        stacks.append([(security_state, SECURITY_RANK), (_slim(robustness), ROBUSTNESS_RANK)])
    uncertainty, optimizer = _train(_OlmoCoreHead(base_hf), UNCERTAINTY_RANK, seed=300)
    torch.save(_fat(uncertainty, optimizer), weights / "uncertainty" / "checkpoint_final.pt")
    stacks.append([(_slim(uncertainty), UNCERTAINTY_RANK)])
    return base_dir, base_hf, weights, stacks


def _reference(base_hf: nn.Module, stack: list[tuple[dict[str, torch.Tensor], int]]) -> torch.Tensor:
    """Logits of the HF model with each LoRA of ``stack`` loaded into peft and merged by peft, in order."""
    model = copy.deepcopy(base_hf)
    for state, rank in stack:
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(FFN.values()),
            layers_to_transform=list(range(TRUNK, N_LAYERS)),
        )
        peft = get_peft_model(model, config)
        params = dict(peft.named_parameters())
        with torch.no_grad():
            for key, tensor in state.items():
                b, linear, half = re.search(r"blocks\.(\d+)\.feed_forward\.(w\d)\.lora_([AB])", key).groups()
                hf_key = f"base_model.model.model.layers.{TRUNK + int(b)}.mlp.{FFN[linear]}.lora_{half}.default.weight"
                params[hf_key].copy_(tensor)
        model = peft.merge_and_unload()
        if hasattr(model, "peft_config"):  # as the original does: else peft reuses this config for the next LoRA
            del model.peft_config
    with torch.no_grad():
        return model(IDS).logits[0]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[:, 0]


# ----- tests ---------------------------------------------------------------------------------------------------------


def test_original_ensemble_matches_peft_merging_the_same_adapters(original):
    _, base_hf, weights, stacks = original
    model = load_original_ensemble(weights_root=weights, device="cpu")  # base: the manifest's base_model
    assert model.n_heads == N_TEXT + 1 and model.uncertainty_head == N_TEXT
    assert model.config.head_layers == DEPTH
    out = _logits(model)
    plain = _reference(base_hf, [])
    for head, stack in enumerate(stacks):
        torch.testing.assert_close(out[head], _reference(base_hf, stack), atol=1e-4, rtol=0)
        assert (out[head] - plain).abs().max() > 1e-2  # the adapters really changed the head
    # security alone is not security + robustness: both adapters of the stack count
    assert (out[0] - _reference(base_hf, stacks[0][:1])).abs().max() > 1e-2


def test_blocks_are_numbered_inside_the_head(original, tmp_path):
    _, _, weights, _ = original
    state = torch.load(weights / "prod" / "shard_0_lora.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if ".blocks.0." in k}, tmp_path / "block0.pt")
    for trunk_layers in (TRUNK, 29):
        adapter = read_original_adapter(tmp_path / "block0.pt", trunk_layers).lora
        assert {layer for layer, _ in adapter.updates} == {trunk_layers}
        assert {name for _, name in adapter.updates} == {"gate_proj", "down_proj", "up_proj"}


def test_rank_and_alpha_come_from_the_manifest_or_the_tensors(original):
    _, _, weights, _ = original
    security = read_original_adapter(weights / "prod" / "shard_0_lora.pt", TRUNK, DEPTH)
    assert (security.lora.rank, security.lora.alpha, security.base_weights) == (SECURITY_RANK, 2.0 * SECURITY_RANK, {})
    robustness = read_original_adapter(weights / "robustness" / "shard_0_lora.pt", TRUNK, DEPTH)  # no manifest
    assert (robustness.lora.rank, robustness.lora.alpha) == (ROBUSTNESS_RANK, 2.0 * ROBUSTNESS_RANK)
    assert "model.layers.2.mlp.gate_proj.weight" in robustness.base_weights  # a fat file's head weights, renamed


def test_rank_that_contradicts_the_manifest_is_refused(original, tmp_path):
    _, _, weights, _ = original
    (tmp_path / "shard_0_lora.pt").write_bytes((weights / "prod" / "shard_0_lora.pt").read_bytes())
    _manifest(tmp_path, 16)
    with pytest.raises(WeightsError, match="rank 4 does not match lora_r=16"):
        read_original_adapter(tmp_path / "shard_0_lora.pt", TRUNK)


def test_file_that_needs_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(
        {"base_model.model.blocks.0.feed_forward.w1.lora_A.default.weight": torch.zeros(2, 2), "x": _Evil()}, path
    )
    with pytest.raises(WeightsError, match=r"evil\.pt holds more than tensors.*refusing"):
        read_original_adapter(path, TRUNK)


def test_unknown_keys_missing_files_and_wrong_shapes_are_reported(original, tmp_path):
    base_dir = original[0]
    lora_a = "base_model.model.blocks.0.{}.lora_A.default.weight"
    lora_b = "base_model.model.blocks.0.{}.lora_B.default.weight"
    cases = {
        "w9.pt": ({lora_a.format("feed_forward.w9"): torch.zeros(4, 64)}, "not a LoRA A/B tensor of a known linear"),
        "name.pt": ({"base_model.model.blocks.0.mlp.lm_head.weight": torch.zeros(2)}, "unknown key"),
        "half.pt": ({lora_a.format("feed_forward.w1"): torch.zeros(4, 64)}, "not both A and B"),
        "deep.pt": ({lora_a.format("feed_forward.w1").replace(".0.", ".5."): torch.zeros(4, 64)}, "2 layers deep"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(WeightsError, match=message):
            read_original_adapter(tmp_path / name, TRUNK, DEPTH)
    # Attention LoRA is read (as q_proj) without a manifest, refused where the manifest's targets exclude it.
    attention = {lora_a.format("attention.w_q"): torch.zeros(4, 64), lora_b.format("attention.w_q"): torch.zeros(64, 4)}
    torch.save(attention, tmp_path / "attention.pt")
    assert set(read_original_adapter(tmp_path / "attention.pt", TRUNK).lora.updates) == {(TRUNK, "q_proj")}
    (tmp_path / "prod").mkdir()
    torch.save(attention, tmp_path / "prod" / "shard_0_lora.pt")
    _manifest(tmp_path / "prod", 4, target_modules=list(FFN))
    with pytest.raises(WeightsError, match="target_modules"):
        read_original_adapter(tmp_path / "prod" / "shard_0_lora.pt", TRUNK)
    with pytest.raises(WeightsError, match="does not exist"):
        read_original_adapter(tmp_path / "nowhere.pt", TRUNK)
    wide = {lora_a.format("feed_forward.w1"): torch.zeros(4, 65), lora_b.format("feed_forward.w1"): torch.zeros(96, 4)}
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(WeightsError, match=r"wide\.pt: LoRA for layer 2 gate_proj has A \(4, 65\)"):
        load_ensemble(base_dir, [tmp_path / "wide.pt"], heads_depth=DEPTH, device="cpu")


def test_head_count_mismatch_and_missing_directories_are_reported(original, tmp_path):
    _, _, weights, _ = original
    with pytest.raises(WeightsError, match="prod does not exist"):
        find_original_weights(tmp_path)  # an empty root: the first missing piece is named
    (tmp_path / "robustness").mkdir()
    (tmp_path / "robustness" / "shard_0_lora.pt").write_bytes((weights / "robustness" / "shard_0_lora.pt").read_bytes())
    with pytest.raises(WeightsError, match=r"head count mismatch.*2 in .*prod.*1 in"):
        find_original_weights(security=weights / "prod", robustness=tmp_path / "robustness")
    (tmp_path / "robustness" / "shard_2_lora.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"shards \[1\] are missing"):
        find_original_weights(robustness=tmp_path / "robustness")
    _manifest(tmp_path / "robustness", 8, num_shards=3)
    (tmp_path / "robustness" / "shard_2_lora.pt").rename(tmp_path / "robustness" / "shard_1_lora.pt")
    with pytest.raises(WeightsError, match="num_shards=3, but 2 shard files"):
        find_original_weights(robustness=tmp_path / "robustness")
    found = find_original_weights(weights)
    assert [[p.parent.name for p in stack] for stack in found.heads] == [["prod", "robustness"]] * N_TEXT
    assert found.uncertainty == weights / "uncertainty" / "checkpoint_final.pt" and found.heads_depth == DEPTH
    with pytest.raises(WeightsError, match="trained on heads 2 layers deep"):
        load_original_ensemble(weights_root=weights, heads_depth=1, device="cpu")


def test_fat_checkpoint_on_another_base_is_refused(original):
    base_dir, _, weights, _ = original
    # Robustness was trained on base + security: alone, its head weights are not the base's.
    with pytest.raises(WeightsError, match=r"differs from head 0's.*Stack the adapters"):
        load_ensemble(base_dir, [weights / "robustness" / "shard_0_lora.pt"], heads_depth=DEPTH, device="cpu")
    # On top of another shard's security LoRA they are not either.
    with pytest.raises(WeightsError, match="differs"):
        load_ensemble(
            base_dir,
            [[weights / "prod" / "shard_1_lora.pt", weights / "robustness" / "shard_0_lora.pt"]],
            heads_depth=DEPTH,
            device="cpu",
        )


def test_stacked_adapters_equal_their_summed_update(original):
    base_dir, _, weights, _ = original
    a1 = read_original_adapter(weights / "prod" / "shard_0_lora.pt", TRUNK).lora
    a2 = read_original_adapter(weights / "robustness" / "shard_1_lora.pt", TRUNK).lora
    # One adapter whose update is the sum: scale 1, [s1 B1 | s2 B2] @ [A1; A2].
    rank = a1.rank + a2.rank
    summed = LoraAdapter(rank, float(rank))
    for key in a1.updates:
        (A1, B1), (A2, B2) = a1.updates[key], a2.updates[key]
        summed.updates[key] = (torch.cat([A1, A2]), torch.cat([a1.scale * B1, a2.scale * B2], dim=1))
    model = load_ensemble(base_dir, [[a1, a2], (a2, a1), summed, a1], heads_depth=DEPTH, device="cpu")
    out = _logits(model)
    torch.testing.assert_close(out[0], out[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], out[2], atol=1e-5, rtol=0)
    assert (out[0] - out[3]).abs().max() > 1e-2


def test_one_adapter_per_head_still_loads(original, tmp_path):
    base_dir, base_hf, weights, stacks = original
    shard = weights / "prod" / "shard_0_lora.pt"
    adapter = read_original_adapter(shard, TRUNK).lora
    model = load_ensemble(base_dir, [None, shard, adapter, str(shard)], heads_depth=DEPTH, device="cpu")
    assert model.n_heads == 4 and model.uncertainty_head is None
    out = _logits(model)
    torch.testing.assert_close(out[0], _reference(base_hf, []), atol=1e-4, rtol=0)
    reference = _reference(base_hf, stacks[0][:1])
    for head in (1, 2, 3):
        torch.testing.assert_close(out[head], reference, atol=1e-4, rtol=0)


def test_original_adapters_convert_to_peft_and_stack_again(original, tmp_path):
    base_dir, base_hf, weights, stacks = original
    config = load_ensemble(base_dir, [None], heads_depth=DEPTH, device="cpu").config
    shard = weights / "prod" / "shard_0_lora.pt"
    out = original_to_peft(shard, tmp_path / "peft", config)
    converted, read = load_lora(out), read_original_adapter(shard, TRUNK).lora
    assert (converted.rank, converted.alpha) == (read.rank, read.alpha)
    assert converted.updates.keys() == read.updates.keys()
    for key, (a, b) in read.updates.items():
        assert torch.equal(converted.updates[key][0], a) and torch.equal(converted.updates[key][1], b)
    # peft itself takes the converted directory onto the HF model.
    peft = PeftModel.from_pretrained(copy.deepcopy(base_hf), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(IDS).logits[0], _reference(base_hf, stacks[0][:1]), atol=1e-4, rtol=0)

    # The whole layout, one PEFT directory per adapter per head, loads back to the same ensemble.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = export_original_weights(find_original_weights(weights), tmp_path / "export", config)
    assert any("fat checkpoint" in str(w.message) for w in caught)
    assert all(p.is_dir() for stack in exported.heads for p in stack) and len(exported.heads[0]) == 2
    again = _logits(load_ensemble(base_dir, exported.heads, exported.uncertainty, heads_depth=DEPTH, device="cpu"))
    expected = _logits(load_original_ensemble(base_dir, weights, device="cpu"))
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)
