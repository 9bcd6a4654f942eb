"""GGUF files (llama.cpp's format, e.g. the embedded SmolLM2) -> ``TransformerConfig`` + HF-named float32 tensors.

Two architectures: ``llama`` (SmolLM2, Llama) and ``olmo2`` (OLMo-2, as llama.cpp's converter writes it). Quantized
tensors are dequantized with the ``gguf`` package (the same code transformers' GGUF loader uses), so for a llama
file the result equals transformers' own load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olmo_tap.model.config import ConfigError, TransformerConfig
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.gguf_header import GGUFHeader, GGUFTensor, read_gguf_header
from olmo_tap.weights.hf import check_hf_shapes, validate_hf_state

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_BLOCK_NAMES = {
    **_LINEAR_NAMES,
    "attn_norm": "input_layernorm",  # Llama is pre-norm: this norm precedes attention ...
    "ffn_norm": "post_attention_layernorm",  # ... and this one precedes the FFN
}
_OLMO2_BLOCK_NAMES = {
    **_LINEAR_NAMES,
    "attn_q_norm": "self_attn.q_norm",  # QK-norm over the whole q (k) projection, not per head
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",  # OLMo-2 normalises each sublayer's output ...
    "post_ffw_norm": "post_feedforward_layernorm",  # ... before adding it to the residual stream
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp writes one architecture: the family it loads as, its block tensors' names, and whether its
    converter reordered the q/k rows for llama.cpp's adjacent-pair rotary (llama does; olmo2 keeps HF's halves,
    which llama.cpp reads as its NEOX rotary)."""

    family: str
    block_names: dict[str, str]
    rotary_rows_reordered: bool


ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", _LLAMA_BLOCK_NAMES, rotary_rows_reordered=True),
    "olmo2": GGUFArchitecture("olmo2", _OLMO2_BLOCK_NAMES, rotary_rows_reordered=False),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.fullmatch(name)
    block_names = ARCHITECTURES[arch].block_names
    if match and match.group(2) in block_names:
        return f"model.layers.{match.group(1)}.{block_names[match.group(2)]}.weight"
    return None


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of the q or k projection rows (``n_heads`` = kv heads for k).

    HF rotates each head's first half of dimensions against its second half; llama.cpp rotates adjacent pairs.
    Its converter therefore reorders every head's rows from ``[0, 1, ..., h-1 | h, ..., 2h-1]`` to
    ``[0, h, 1, h+1, ...]``: it views the rows as (heads, 2, h) and swaps the last two axes. Viewing the GGUF rows
    as (heads, h, 2) and swapping back restores HF's order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot undo the rotary row order: {rows} rows do not split into {n_heads} heads x pairs")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _metadata(header: GGUFHeader, key: str, source: Path, default: Any = ...) -> Any:
    """One metadata value; ``default`` when absent (a missing key without a default is an error)."""
    if key not in header.metadata:
        if default is ...:
            raise WeightsError(f"GGUF file {source} lacks metadata key {key!r}")
        return default
    return header.metadata[key]


def _config_from_gguf(header: GGUFHeader, source: Path) -> TransformerConfig:
    arch = _metadata(header, "general.architecture", source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def meta(key: str, default: Any = ...) -> Any:
        return _metadata(header, f"{arch}.{key}", source, default)

    def integer(key: str, default: Any = ...) -> Any:
        """An integer field (None when absent with default None); any other type is the file's error, named."""
        value = _metadata(header, key, source, default)
        if isinstance(value, list) and "head_count" in key:
            raise ConfigError(f"{source}: per-layer head counts are unsupported")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value

    if meta("attention.sliding_window", None) is not None:  # OLMo-3, which llama.cpp also writes as olmo2
        raise ConfigError(f"{source}: sliding-window attention ({arch}.attention.sliding_window) is unsupported")
    scaling = meta("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ConfigError(f"{source}: unsupported rope scaling type {scaling!r}; only unscaled RoPE")
    d_model, n_heads = integer(f"{arch}.embedding_length"), integer(f"{arch}.attention.head_count")
    head_dim = integer(f"{arch}.attention.key_length", None) or (d_model // n_heads if n_heads else 0)
    for key in ("attention.value_length", "rope.dimension_count"):
        value = integer(f"{arch}.{key}", head_dim)
        if value != head_dim:  # partial rotary or a different value width: not in our layer implementation
            raise ConfigError(f"{source}: {arch}.{key} = {value} differs from head_dim {head_dim}; unsupported")

    tensors = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"GGUF file {source} has no token_embd.weight tensor")
    n_layers, ffn_hidden = integer(f"{arch}.block_count"), integer(f"{arch}.feed_forward_length")
    n_kv_heads = integer(f"{arch}.attention.head_count_kv", n_heads)
    max_seq_len = integer(f"{arch}.context_length", 2048)
    bos, eos = integer("tokenizer.ggml.bos_token_id", None), integer("tokenizer.ggml.eos_token_id", None)
    try:
        return TransformerConfig(
            family=ARCHITECTURES[arch].family,
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml shapes are (cols, rows)
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_hidden=ffn_hidden,
            rope_theta=float(meta("rope.freq_base", 10000.0)),
            norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensors,
            max_seq_len=max_seq_len,
            bos_token_id=bos,
            eos_token_id=eos,
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from e


class GGUFFile:
    """An open GGUF file of a supported architecture: its config, and its tensors by HF name, each read and decoded
    on request (so a loader that keeps the blocks quantized never holds the whole model in float, nor the file)."""

    def __init__(self, path: str | Path) -> None:
        source = Path(path).expanduser()
        if not source.exists():
            raise WeightsError(f"GGUF file {source} does not exist")
        if not source.is_file():
            raise WeightsError(f"{source} is not a file (expected a .gguf file)")
        header = read_gguf_header(source)
        self.source = source
        self.config = _config_from_gguf(header, source)
        arch = header.metadata["general.architecture"]  # checked by _config_from_gguf
        self.architecture = ARCHITECTURES[arch]
        unknown = [t.name for t in header.tensors if gguf_to_hf_name(t.name, arch) is None]
        if "rope_freqs.weight" in unknown:  # Llama-3.1-style frequency scaling
            raise ConfigError(f"{source}: rope frequency scaling (rope_freqs.weight) is unsupported")
        if unknown:
            raise WeightsError(f"GGUF file {source} has tensors olmo-tap does not know: {', '.join(unknown[:5])}")
        self.tensors: dict[str, GGUFTensor] = {gguf_to_hf_name(t.name, arch): t for t in header.tensors}  # type: ignore[misc]
        # every tensor's shape against the config, from the header: a loader that keeps the blocks reads no float
        # copy to check (ggml lists dimensions innermost first)
        shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in self.tensors.items()}
        check_hf_shapes(self.config, shapes, str(source))

    def rotary_heads(self, hf_name: str) -> int | None:
        """The head count whose rows llama.cpp reordered in tensor ``hf_name`` (q or k of a llama file), else None."""
        if not self.architecture.rotary_rows_reordered:
            return None
        if hf_name.endswith("q_proj.weight"):
            return self.config.n_heads
        if hf_name.endswith("k_proj.weight"):
            return self.config.n_kv_heads
        return None

    def type_name(self, hf_name: str) -> str:
        return self.tensors[hf_name].tensor_type.name

    def float(self, hf_name: str, rows: range | None = None) -> torch.Tensor:
        """Tensor ``hf_name`` dequantized to float32 by the ``gguf`` package, q/k rows in HF's rotary order; only
        output rows ``rows`` if given (of a table, in chunks, so its float copy never exists whole)."""
        from gguf.quants import dequantize

        try:
            tensor = self.tensors[hf_name]
        except KeyError:
            raise WeightsError(f"GGUF file {self.source} has no tensor for {hf_name}") from None
        heads = self.rotary_heads(hf_name)
        if rows is not None and (rows.step != 1 or heads is not None):
            raise ValueError(
                "rows of a GGUF tensor read as one ascending run, and not of llama's q/k (their rows move)"
            )
        start, stop = (0, tensor.data_shape[0]) if rows is None else (rows.start, rows.stop)
        try:
            values = dequantize(tensor.rows_data(start, stop), tensor.tensor_type)
        except Exception as e:
            raise WeightsError(
                f"GGUF file {self.source}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {e}"
            ) from e
        # a fresh read of the file: float32 tensors come back as that array itself, writable and the loader's own
        weight = torch.from_numpy(np.asarray(values, dtype=np.float32))
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
        shape = (stop - start, *shape[1:])
        if tuple(weight.shape) != shape:
            raise WeightsError(f"GGUF file {self.source}: {tensor.name} decoded to {tuple(weight.shape)}, not {shape}")
        return weight if heads is None else unpermute_rope_rows(weight, heads)


def read_gguf(
    path: str | Path, progress: bool = False, bar: Any | None = None
) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file (llama or olmo2) into (config, HF-named float32 tensors).

    q/k rows are restored to HF's rotary layout. ``lm_head.weight`` is absent when the embeddings are tied.
    ``bar``: an existing tqdm bar to advance once per tensor (its total is raised by the tensor count);
    otherwise ``progress`` shows a bar of its own.
    """
    file = GGUFFile(path)
    own_bar = None
    if bar is None and progress:
        from tqdm.auto import tqdm

        bar = own_bar = tqdm(total=0, desc=f"reading {file.source.name}", unit="tensor")
    if bar is not None:
        bar.total = (bar.total or 0) + len(file.tensors)
        bar.refresh()
    state: dict[str, torch.Tensor] = {}
    try:
        for hf_name in file.tensors:
            state[hf_name] = file.float(hf_name)
            if bar is not None:
                bar.update(1)
    finally:
        if own_bar is not None:
            own_bar.close()
    return file.config, validate_hf_state(file.config, state, str(file.source))
