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

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from olmo_tap.hydra import HydraTransformer, HydraTransformerConfig
from olmo_tap.memory import release_freed_memory
from olmo_tap.model.layers import RMSNorm
from olmo_tap.quant.gguf import quantized_from_gguf
from olmo_tap.quant.linear import native_ready
from olmo_tap.quant.weights import ROWS_PER_CHUNK, QuantizedStack, QuantizedWeight, concat_rows, quantize
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.gguf import GGUFFile, unpermute_rope_rows
from olmo_tap.weights.layout import _block_and_towers, hf_linear_name, linear_weight, load_norms
from olmo_tap.weights.lora import LoraAdapter, check_head_layers, checked_delta

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
    """The file's quantized tensors by HF name, decoded on first use (llama's q/k rows back in HF's rotary order)."""

    def __init__(self, path: str | Path) -> None:
        self.file = GGUFFile(path)
        self.decoded: dict[str, QuantizedWeight] = {}

    def weight(self, name: str) -> QuantizedWeight:
        if name not in self.decoded:
            if name not in self.file.tensors:
                raise WeightsError(f"{self.file.source} has no tensor for {name}")
            qw = quantized_from_gguf(self.file.tensors[name], str(self.file.source))
            heads = self.file.rotary_heads(name)
            if heads is not None:
                qw = qw.select_rows(unpermute_rope_rows(torch.arange(qw.out_features), heads))
            self.decoded[name] = qw
        return self.decoded[name]

    def fallback_scheme(self, name: str) -> str:
        """The scheme of the file type's width, for a weight that is not the file's own (a merged head)."""
        return "int4" if self.file.type_name(name).startswith("Q4") else "int8"


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


# (base layer, tower, HF linear name) -> that linear's quantized weight (out, in)
PartWeight = Callable[[int, int, str], QuantizedWeight]
# (base layer, earlier tower, tower, HF linear names) -> whether the two towers hold the same weights there
SameWeights = Callable[[int, int, int, tuple[str, ...]], bool]


def _fill_quantized(
    model: HydraTransformer,
    part_weight: PartWeight,
    same_weights: SameWeights,
    embed: QuantizedWeight,
    head: QuantizedWeight,
    scheme: str,
    gguf: _GGUFSource | None,
) -> None:
    """Give every linear of ``model`` its quantized weight (a tower equal to an earlier one shares its copy), the
    embedding and lm_head theirs, release the float weights and label the model."""
    sources = {embed.source, head.source}
    for layer in range(model.base_config.n_layers):
        block, towers = _block_and_towers(model, layer)
        for fused, parts in FUSED_PARTS.items():
            stacks: list[QuantizedStack] = []
            for tower in towers:
                same = next((i for i in range(len(stacks)) if same_weights(layer, i, tower, parts)), None)
                if same is not None:
                    stacks.append(stacks[same])
                    continue
                quantized = [part_weight(layer, tower, part) for part in parts]
                sources.update(q.source for q in quantized)
                stacks.append(QuantizedStack.of(quantized))
            block._packed[fused].quantized = stacks
        release_freed_memory(collect=False)  # this layer's temporaries (decoded blocks, merged heads), freed already
    model._packed_lm_head.quantized = [QuantizedStack([head])]
    model.quantized_embed = embed
    for block in model._blocks():
        for name, packed in block._packed.items():
            _release(block, name)
            packed.release()  # the float weight's packed copies go with it
    _release(model, "lm_head")
    model._packed_lm_head.release()
    _release(model.embed, "weight")
    if native_ready():  # the native kernel reads the tiled layout (the other routes read rows back from it)
        for weight in [model.quantized_embed, *(part for stack in quantized_stacks(model) for part in stack.parts)]:
            weight.tile_()  # in place: towers sharing a copy keep sharing it
        release_freed_memory(collect=False)
    model.quantization = scheme if gguf is None else f"gguf ({', '.join(sorted(sources))})"
    model.quantization_scheme = scheme


def _check_can_quantize(model: HydraTransformer, scheme: str, gguf_path: str | Path | None) -> None:
    check_scheme(scheme)
    if model.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.quantization})")
    if model.device.type != "cpu":
        raise ValueError(f"quantized weights run on the CPU; this model is on {model.device}")
    if (scheme == "gguf") != (gguf_path is not None):
        raise ValueError("--quantize gguf keeps a GGUF file's blocks: it needs a .gguf source, and only it does")


@torch.no_grad()
def quantize_model(model: HydraTransformer, scheme: str, gguf_path: str | Path | None = None) -> HydraTransformer:
    """Quantize ``model`` in place (see the module doc) and return it."""
    _check_can_quantize(model, scheme, gguf_path)
    gguf = _GGUFSource(gguf_path) if gguf_path is not None else None

    def float_part(layer: int, tower: int, part: str) -> torch.Tensor:
        block, _ = _block_and_towers(model, layer)
        return linear_weight(block, tower, part).t()

    def part_weight(layer: int, tower: int, part: str) -> QuantizedWeight:
        return _quantize_part(float_part(layer, tower, part), scheme, hf_linear_name(layer, part), gguf)

    def same_weights(layer: int, first: int, tower: int, parts: tuple[str, ...]) -> bool:
        return all(torch.equal(float_part(layer, first, p), float_part(layer, tower, p)) for p in parts)

    c = model.base_config
    embed_rows = model.embed.weight
    embed = _quantize_part_padded(embed_rows, scheme, "model.embed_tokens.weight", gguf, c.vocab_size)
    lm_head = model.lm_head.t()
    if torch.equal(lm_head, embed_rows):
        head = embed
    else:
        head = _quantize_part_padded(lm_head, scheme, "lm_head.weight", gguf, c.vocab_size)
    _fill_quantized(model, part_weight, same_weights, embed, head, scheme, gguf)
    return model


def _quantize_part_padded(
    weight: torch.Tensor, scheme: str, name: str, gguf: _GGUFSource | None, rows: int
) -> QuantizedWeight:
    """A (vocab, d) table: a GGUF table holds the checkpoint's rows only, the model's is padded with zeros."""
    if gguf is not None and name in gguf.file.tensors:
        kept = gguf.weight(name)
        n = kept.out_features
        if torch.equal(kept.dequantize(), weight[:n].float()) and not weight[n:].any():
            return _pad_rows(kept, rows)
    return quantize(weight, scheme if gguf is None else "int8")


@torch.no_grad()
def load_gguf_quantized(
    path: str | Path,
    n_heads: int,
    heads_depth: int,
    scheme: str,
    merges: Sequence[Sequence[LoraAdapter]] = (),
) -> HydraTransformer:
    """A quantized Hydra built straight from a GGUF file, never holding the model in float: the same weights as
    loading it in fp32, merging ``merges[h]`` (LoRA adapters, in order) into head h and ``quantize_model``.

    One linear at a time is decoded to float where it must be (a merged head, or ``int8``/``int4``
    requantization); everything else keeps the file's blocks. Peak memory is the quantized model plus one layer.
    """
    check_scheme(scheme)
    gguf = _GGUFSource(path)
    config = HydraTransformerConfig.split(gguf.file.config, n_heads, heads_depth)
    if len(merges) > config.n_heads:
        raise ValueError(f"adapters for {len(merges)} heads, but the model has {config.n_heads}")
    for adapters in merges:
        for adapter in adapters:
            check_head_layers(adapter, config.trunk_layers, config.base_config.n_layers)
    model = config.build(init_device="meta")
    for module in model.modules():
        if isinstance(module, RMSNorm):  # the norms are the only float weights a quantized model keeps
            module.weight = nn.Parameter(torch.empty(module.weight.shape), requires_grad=False)
    model.reset_rope()
    load_norms(model, gguf.file.float)

    def adapters_at(layer: int, tower: int, part: str) -> list[LoraAdapter]:
        if layer < config.trunk_layers or tower >= len(merges):
            return []
        return [a for a in merges[tower] if (layer, part) in a.updates]

    def part_weight(layer: int, tower: int, part: str) -> QuantizedWeight:
        name = hf_linear_name(layer, part)
        adapters = adapters_at(layer, tower, part)
        if scheme == "gguf" and not adapters:
            return gguf.weight(name)
        weight = gguf.file.float(name)
        for adapter in adapters:  # in merge_lora's order and arithmetic: the same floats as the fp32 load
            weight.add_(checked_delta(adapter, layer, part, tuple(weight.shape)))
        return quantize(weight, gguf.fallback_scheme(name) if scheme == "gguf" else scheme)

    def same_weights(layer: int, first: int, tower: int, parts: tuple[str, ...]) -> bool:
        return not any(adapters_at(layer, t, p) for t in (first, tower) for p in parts)

    c = config.base_config
    tables = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in gguf.file.tensors:
            continue  # tied embeddings: the file has no output.weight
        if scheme == "gguf":
            tables[name] = _pad_rows(gguf.weight(name), c.vocab_size)
        else:  # rows quantize independently: a chunk at a time, so the table's float copy never exists whole
            n = gguf.file.tensors[name].data_shape[0]
            starts = range(0, n, ROWS_PER_CHUNK)
            quantized = [quantize(gguf.file.float(name, range(i, min(i + ROWS_PER_CHUNK, n))), scheme) for i in starts]
            if n < c.vocab_size:  # the model's padding rows quantize as the fp32 load's zeros do
                quantized.append(quantize(torch.zeros(c.vocab_size - n, c.d_model), scheme))
            tables[name] = concat_rows(quantized)
    embed = tables["model.embed_tokens.weight"]
    _fill_quantized(
        model,
        part_weight,
        same_weights,
        embed,
        tables.get("lm_head.weight", embed),
        scheme,
        gguf if scheme == "gguf" else None,
    )
    return model.eval()


def quantized_stacks(model: HydraTransformer) -> list[QuantizedStack]:
    """The quantized projections of ``model``'s blocks and lm_head, each shared copy once."""
    seen: dict[int, QuantizedStack] = {}
    for block in model._blocks():
        for packed in block._packed.values():
            for stack in packed.quantized or []:
                seen[id(stack)] = stack
    for stack in model._packed_lm_head.quantized or []:
        seen[id(stack)] = stack
    return list(seen.values())


def quantized_bytes(model: HydraTransformer) -> int:
    """Bytes the quantized weights take, each shared copy counted once."""
    total = sum(s.nbytes for s in quantized_stacks(model))
    if model.quantized_embed is not None and not any(
        model.quantized_embed is p for s in model._packed_lm_head.quantized or [] for p in s.parts
    ):
        total += model.quantized_embed.nbytes
    return total
