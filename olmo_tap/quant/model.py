"""Quantize a loaded Hydra in place: every linear weight (trunk, heads, lm_head) and the embedding table.

Schemes (``--quantize``):

- ``int8``: symmetric, one scale per output channel; ``int4``: asymmetric, groups of 32 inputs (Q4_1's rule);
- ``gguf``: the GGUF file's own blocks where the model's weight is exactly the file's (every trunk layer; heads
  without an adapter), so nothing is requantized; a weight that differs from the file (a head with its LoRA merged)
  is quantized after the merge in the scheme of its file type's width (4-bit types -> int4, others -> int8).

Heads are quantized from the weights the model holds, so a trained jury's adapters are merged first. Identical
towers (the clones of an untrained split) share one quantized copy. The float weights are released: the model
keeps their shapes (on the meta device) for bookkeeping; anything that needs them (training, LoRA merging,
gradients, saving an ensemble) refuses a quantized model by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from olmo_tap.hydra import HydraTransformer
from olmo_tap.quant.gguf import quantized_from_gguf, read_quantized_gguf
from olmo_tap.quant.weights import QuantizedStack, QuantizedWeight, quantize
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.gguf import unpermute_rope_rows
from olmo_tap.weights.layout import _block_and_towers, hf_linear_name, linear_weight

QUANTIZE_CHOICES = ("int8", "int4", "gguf")
# fused parameter -> the HF linear layers whose output rows it stacks, in order
FUSED_PARTS = {
    "wqkv": ("q_proj", "k_proj", "v_proj"),
    "wo": ("o_proj",),
    "w13": ("gate_proj", "up_proj"),
    "w2": ("down_proj",),
}


def check_scheme(scheme: str) -> str:
    if scheme not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {scheme!r}")
    return scheme


class _GGUFSource:
    """The file's quantized tensors by HF name, decoded on first use (q/k rows back in HF's rotary order)."""

    def __init__(self, path: Path, model: HydraTransformer) -> None:
        self.path = path
        self.tensors = read_quantized_gguf(path)
        self.config = model.base_config
        self.decoded: dict[str, QuantizedWeight] = {}

    def weight(self, name: str) -> QuantizedWeight:
        if name not in self.decoded:
            if name not in self.tensors:
                raise WeightsError(f"{self.path} has no tensor for {name}")
            qw = quantized_from_gguf(self.tensors[name][1], str(self.path))
            heads = {"q_proj": self.config.n_heads, "k_proj": self.config.n_kv_heads}
            kind = name.split(".")[-2]
            if kind in heads:
                qw = qw.select_rows(unpermute_rope_rows(torch.arange(qw.out_features), heads[kind]))
            self.decoded[name] = qw
        return self.decoded[name]

    def fallback_scheme(self, name: str) -> str:
        return "int4" if self.tensors[name][0].startswith("Q4") else "int8"


def _quantize_part(weight: torch.Tensor, scheme: str, name: str, gguf: _GGUFSource | None) -> QuantizedWeight:
    """``weight`` (out, in) in ``scheme``; with a GGUF source, the file's own blocks if they hold exactly it."""
    if gguf is None:
        return quantize(weight, scheme)
    kept = gguf.weight(name)
    if kept.shape == tuple(weight.shape) and torch.equal(kept.dequantize(), weight.float()):
        return kept
    return quantize(weight, gguf.fallback_scheme(name))


def _pad_rows(qw: QuantizedWeight, rows: int) -> QuantizedWeight:
    """``qw`` with zero rows appended up to ``rows`` (the model's padded vocabulary)."""
    extra = rows - qw.out_features
    if extra <= 0:
        return qw

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, t.new_zeros(extra, *t.shape[1:])))

    minimum = None if qw.minimum is None else pad(qw.minimum)
    return QuantizedWeight(qw.scheme, pad(qw.codes), pad(qw.scale), minimum, qw.group, qw.source)


def _release(module: nn.Module, name: str) -> None:
    """Replace float parameter ``name`` by a meta tensor of its shape: the memory goes, the shape stays."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))


@torch.no_grad()
def quantize_model(model: HydraTransformer, scheme: str, gguf_path: str | Path | None = None) -> HydraTransformer:
    """Quantize ``model`` in place (see the module doc) and return it."""
    check_scheme(scheme)
    if model.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.quantization})")
    if model.device.type != "cpu":
        raise ValueError(f"quantized weights run on the CPU; this model is on {model.device}")
    if (scheme == "gguf") != (gguf_path is not None):
        raise ValueError("--quantize gguf keeps a GGUF file's blocks: it needs a .gguf source, and only it does")
    gguf = _GGUFSource(Path(gguf_path), model) if gguf_path is not None else None
    c = model.base_config
    sources: set[str] = set()
    for layer in range(c.n_layers):
        block, towers = _block_and_towers(model, layer)
        for fused, parts in FUSED_PARTS.items():
            stacks: list[QuantizedStack] = []
            for tower in towers:
                floats = [linear_weight(block, tower, part).t() for part in parts]
                same = next(
                    (
                        i
                        for i in range(len(stacks))
                        if all(
                            torch.equal(a, linear_weight(block, i, p).t()) for a, p in zip(floats, parts, strict=True)
                        )
                    ),
                    None,
                )
                if same is not None:  # a clone of an earlier tower: share its codes
                    stacks.append(stacks[same])
                    continue
                quantized = [
                    _quantize_part(w, scheme, hf_linear_name(layer, p), gguf)
                    for w, p in zip(floats, parts, strict=True)
                ]
                sources.update(q.source for q in quantized)
                stacks.append(QuantizedStack.of(quantized))
            block._packed[fused].quantized = stacks
    embed_rows = model.embed.weight
    embed = _quantize_part_padded(embed_rows, scheme, "model.embed_tokens.weight", gguf, c.vocab_size)
    lm_head = model.lm_head.t()
    if torch.equal(lm_head, embed_rows):
        head = embed
    else:
        head = _quantize_part_padded(lm_head, scheme, "lm_head.weight", gguf, c.vocab_size)
    sources.update((embed.source, head.source))
    model._packed_lm_head.quantized = [QuantizedStack([head])]
    model.quantized_embed = embed
    for block in model._blocks():
        for name, packed in block._packed.items():
            _release(block, name)
            packed.packs, packed.key = None, None  # the float weight's oneDNN copy goes with it
    _release(model, "lm_head")
    model._packed_lm_head.packs, model._packed_lm_head.key = None, None
    _release(model.embed, "weight")
    model.quantization = scheme if gguf is None else f"gguf ({', '.join(sorted(sources))})"
    model.quantization_scheme = scheme
    return model


def _quantize_part_padded(
    weight: torch.Tensor, scheme: str, name: str, gguf: _GGUFSource | None, rows: int
) -> QuantizedWeight:
    """A (vocab, d) table: a GGUF table holds the checkpoint's rows only, the model's is padded with zeros."""
    if gguf is not None and name in gguf.tensors:
        kept = gguf.weight(name)
        n = kept.out_features
        if torch.equal(kept.dequantize(), weight[:n].float()) and not weight[n:].any():
            return _pad_rows(kept, rows)
    return quantize(weight, scheme if gguf is None else "int8")


def quantized_bytes(model: HydraTransformer) -> int:
    """Bytes the quantized weights take, each shared copy counted once."""
    seen: dict[int, Any] = {}
    for block in model._blocks():
        for packed in block._packed.values():
            for stack in packed.quantized or []:
                seen[id(stack)] = stack
    for stack in model._packed_lm_head.quantized or []:
        seen[id(stack)] = stack
    total = sum(s.nbytes for s in seen.values())
    if model.quantized_embed is not None and not any(
        model.quantized_embed is p for s in model._packed_lm_head.quantized or [] for p in s.parts
    ):
        total += model.quantized_embed.nbytes
    return total
