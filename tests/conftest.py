"""Shared fixtures: tiny random checkpoints written by transformers itself, and the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 101


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random transformers model of ``family`` ('llama' with GQA + tied embeddings, or 'olmo2')."""
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if family == "llama":
        config = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, **common)
        model = LlamaForCausalLM(config)
    else:
        config = Olmo2Config(num_key_value_heads=4, rope_theta=500000.0, **common)
        model = Olmo2ForCausalLM(config)
    # Random norms, so a norm that is applied in the wrong place or not at all shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine every small op waits for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=["llama", "olmo2"])
def tiny_checkpoint(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    """(family, directory, transformers model) of a tiny random checkpoint saved with save_pretrained."""
    family = request.param
    model = tiny_hf_model(family)
    directory = tmp_path_factory.mktemp(f"tiny-{family}")
    model.save_pretrained(directory)
    return family, directory, model


@pytest.fixture(scope="session")
def olmo_tap_cache(tmp_path_factory) -> Path:
    """A cache directory shared by the whole session (the embedded default converts once)."""
    cache = os.environ.get("OLMO_TAP_TEST_CACHE")
    path = Path(cache) if cache else tmp_path_factory.mktemp("olmo-tap-cache")
    os.environ["OLMO_TAP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm(olmo_tap_cache):
    """The embedded default, the trained jury (5 text heads x 3 layers + the uncertainty head; fp32, CPU), and its
    tokenizer."""
    from olmo_tap import HydraTransformer, load_tokenizer

    model = HydraTransformer.from_pretrained("smollm2-135m-instruct", progress=False)
    return model, load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_clones(olmo_tap_cache):
    """The embedded model as released, split into 5 identical heads of 3 layers (the clones preset)."""
    from olmo_tap import HydraTransformer, load_tokenizer

    model = HydraTransformer.from_pretrained("smollm2-135m-instruct-clones", progress=False)
    return model, load_tokenizer("smollm2-135m-instruct-clones")
