"""The embedded default is a trained jury: shipped PEFT adapters, merged at load, rebuilt bit for bit by
``olmo-tap train default-jury``; the untrained clones stay available under their own preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from olmo_tap import HydraTransformer
from olmo_tap.cli import main
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.prompts import encode_chat
from olmo_tap.train.default_jury import N_TEXT_HEADS, jury_dir
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.lora import load_lora, merge_lora
from olmo_tap.weights.presets import CLONES_MODEL, DEFAULT_MODEL


def test_the_default_is_a_trained_jury_with_an_uncertainty_head(smollm, smollm_clones):
    jury, clones = smollm[0], smollm_clones[0]
    assert jury.n_heads == N_TEXT_HEADS + 1 and jury.uncertainty_head == N_TEXT_HEADS
    assert jury.n_text_heads == N_TEXT_HEADS and not jury.identical_heads(range(N_TEXT_HEADS))
    assert clones.uncertainty_head is None and clones.identical_heads()
    assert torch.equal(jury.embed.weight, clones.embed.weight)  # the trunk is the released model's
    for a, b in zip(jury.trunk.parameters(), clones.trunk.parameters(), strict=True):
        assert torch.equal(a, b)


def test_each_head_is_the_base_plus_its_own_shipped_adapter(smollm, olmo_tap_cache):
    """Rebuilt here from the shipped files with the generic LoRA merge: the preset merges nothing else."""
    base = HydraTransformer.from_pretrained(CLONES_MODEL, n_heads=N_TEXT_HEADS + 1, progress=False)
    adapters = [load_lora(jury_dir() / f"head{h}") for h in range(N_TEXT_HEADS)]
    for head, adapter in enumerate(adapters):
        merge_lora(base, head, adapter)
    meta = json.loads((jury_dir() / "jury.json").read_text())
    merge_lora(base, N_TEXT_HEADS, adapters[meta["uncertainty_init_from"]])
    merge_lora(base, N_TEXT_HEADS, load_lora(jury_dir() / "uncertainty"))
    for a, b in zip(smollm[0].heads.parameters(), base.heads.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_shipped_adapters_are_small_and_read_by_peft(smollm, transformers_gguf_reference):
    """peft applies head 0's adapter to transformers' own model of the same GGUF file: the same logits as the
    jury's head 0 (an outside reference for the layout and the merge)."""
    import copy

    from peft import PeftModel

    files = sorted(jury_dir().glob("*/adapter_model.safetensors"))
    assert len(files) == N_TEXT_HEADS + 1
    assert sum(f.stat().st_size for f in files) < 8 * 2**20  # a few MB in all
    model, tokenizer = smollm
    reference = copy.deepcopy(transformers_gguf_reference)  # peft changes the model it wraps
    reference = PeftModel.from_pretrained(reference, str(jury_dir() / "head0")).eval()
    ids = torch.tensor([encode_chat(tokenizer, "What is the capital of Peru? Answer in a few words.")])
    with torch.no_grad():
        expected = reference(ids).logits[0]
        ours = model(ids)[0, 0]
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=0)


def test_the_trained_jury_certifies_and_the_clones_do_not(smollm, smollm_clones):
    for (model, tokenizer), certified in ((smollm, True), (smollm_clones, False)):
        out = PoE(model, tokenizer, max_new_tokens=16, seed=3).generate_with_cache("Name a fruit.", temperature=0)
        assert out.independent_heads is certified and out.certified is certified
        assert (out.verdict == "certified by the jury") is certified


def test_another_split_of_the_trained_preset_is_refused_by_name(olmo_tap_cache):
    with pytest.raises(WeightsError, match=f"trained jury of 5 text heads.*{CLONES_MODEL}"):
        HydraTransformer.from_pretrained(DEFAULT_MODEL, n_heads=3, progress=False)
    assert HydraTransformer.from_pretrained(DEFAULT_MODEL, n_heads=6, heads_depth=3, progress=False).n_heads == 6


def test_train_default_jury_rebuilds_a_shipped_adapter_bit_for_bit(reproducible_reruns):
    """One head's adapter, rebuilt by the same command (in its reproducible environment, a fresh process) from the
    embedded base and the shipped data, equals the shipped file byte for byte. The command (``olmo-tap train
    default-jury --heads 0 --compare``) runs in the background beside the shipped GCG bank's rerun (conftest)."""
    rerun = reproducible_reruns["default-jury"]
    done = rerun.wait(timeout=1200)
    out = Path(rerun.command[rerun.command.index("--out") + 1])
    assert done.returncode == 0, done.stdout + done.stderr
    rebuilt = (out / "head0" / "adapter_model.safetensors").read_bytes()
    if rebuilt != (jury_dir() / "head0" / "adapter_model.safetensors").read_bytes():
        # only where this CPU's pinned arithmetic already rounds the loss before training differently
        assert "pinned arithmetic differs" in done.stdout and "within tolerance" in done.stdout, done.stdout
    else:
        assert "head0/adapter_model.safetensors: identical to the shipped file" in done.stdout


def _fake_jury(directory, loss_before: float, scale: float) -> None:
    from safetensors.torch import save_file

    (directory / "head0").mkdir(parents=True)
    save_file({"lora_A": torch.full((2, 3), scale)}, str(directory / "head0" / "adapter_model.safetensors"))
    head = {"head": 0, "steps": 5, "loss_before": loss_before, "loss_after": 0.5}
    (directory / "jury.json").write_text(json.dumps({"heads": [head], "data": {"digest": "d"}}))


@pytest.mark.parametrize(
    ("loss_before", "scale", "accepted"),
    [
        (1.0, 1.0, True),  # the same bytes
        (1.0, 1.001, False),  # the same arithmetic gave other weights: a real difference
        (1.0000001, 1.001, True),  # this CPU rounds differently from the builder's, and the weights stay close
        (1.0000001, 1.5, False),  # ... but not this far
    ],
)
def test_compare_tells_other_rounding_from_other_weights(tmp_path, capsys, loss_before, scale, accepted):
    from olmo_tap.train.cli import _same_as_shipped

    _fake_jury(tmp_path / "shipped", 1.0, 1.0)
    _fake_jury(tmp_path / "out", loss_before, scale)
    assert _same_as_shipped(tmp_path / "out", tmp_path / "shipped") is accepted


def test_cli_summary_of_the_default_says_certified(smollm, capsys):
    assert main(["generate", "What is the capital of Italy?", "--greedy", "--max-new-tokens", "16"]) == 0
    err = capsys.readouterr().err
    assert "certified by the jury" in err and "identical heads" not in err


def test_experiment_signals_end_to_end(smollm, smollm_clones, tmp_path, capsys):
    """A short run of the experiment: every decoder, every signal, the uncertainty head, the files."""
    out = tmp_path / "signals"
    args = ["experiment", "signals", "--questions", "6", "--mcq", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "signals.json").read_text())
    assert set(results["decoders"]) == {"base", "single", "naive", "jury"} and results["questions"] == 6
    for decoder in results["decoders"].values():
        assert 0 <= decoder["accuracy"] <= 1 and len(decoder["risk_coverage"]) == 10
        assert all(s["auroc"] is None or 0 <= s["auroc"] <= 1 for s in decoder["signals"].values())
    assert "acceptance rate" in results["decoders"]["jury"]["signals"]
    assert "acceptance rate" not in results["decoders"]["single"]["signals"]
    assert results["uncertainty_head"]["n"] + results["uncertainty_head"]["abstained"] == 3
    assert (out / "signals.png").stat().st_size > 0 and (out / "signals.md").read_text() in printed
    assert main([*args[:2], "--questions", "0"]) == 2  # a bad count is refused by name
    assert "--questions must be a positive integer" in capsys.readouterr().err


def test_train_default_jury_refuses_unknown_heads_before_any_work(tmp_path, capsys):
    for heads in ("7", ",", "0,5"):
        assert main(["train", "default-jury", "--out", str(tmp_path / "j"), "--heads", heads]) == 2
        assert "--heads must list text heads in 0..4" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()
