"""Per-head LoRA adapters: read the common ``lora_A`` / ``lora_B`` layout and merge into one head.

An adapter is a set of low-rank updates ``W += (alpha / r) * B @ A`` on linear
layers of the head's blocks. We read PEFT's layout (``adapter_config.json`` +
``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.29.mlp.gate_proj.lora_A.weight``) and the
original OLMo-core names (``blocks.29.feed_forward.w1.lora_A.weight``). Layer
numbers are the base model's; an adapter touching a trunk layer is refused,
since the trunk is shared by every head.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from olmo_tap.hydra import HydraTransformer
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.layout import LINEAR_NAMES, linear_weight

_OLMO_CORE_LINEARS = {
    "w_q": "q_proj",
    "w_k": "k_proj",
    "w_v": "v_proj",
    "w_out": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}
_HF_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_OLMO_CORE_KEY = re.compile(r"blocks\.(\d+)\.(?:attention|feed_forward)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    """Low-rank updates keyed by (base layer index, HF linear name) -> (A (r, in), B (out, r))."""

    rank: int
    alpha: float
    updates: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, layer: int, name: str) -> torch.Tensor:
        """The dense update (out, in) of one linear layer."""
        a, b = self.updates[(layer, name)]
        return self.scale * (b.float() @ a.float())


def parse_lora_state(state: dict[str, torch.Tensor], rank: int, alpha: float) -> LoraAdapter:
    """Group ``lora_A``/``lora_B`` tensors by (layer, linear) in either naming scheme."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _HF_KEY.search(key)
        name = match.group(2) if match else None
        if match is None:
            match = _OLMO_CORE_KEY.search(key)
            name = _OLMO_CORE_LINEARS.get(match.group(2)) if match else None
        if match is None or name is None:
            raise WeightsError(
                f"unrecognised LoRA tensor {key!r} (expected ...layers.N.<module>.<proj>.lora_A/B.weight)"
            )
        if name not in LINEAR_NAMES:
            raise WeightsError(
                f"LoRA tensor {key!r} targets {name!r}, not a linear layer of a block ({', '.join(LINEAR_NAMES)})"
            )
        halves.setdefault((int(match.group(1)), name), {})[match.group(3)] = tensor
    adapter = LoraAdapter(rank, alpha)
    for target, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise WeightsError(f"LoRA for layer {target[0]} {target[1]} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.size(0) != rank or b.size(1) != rank:
            raise WeightsError(
                f"LoRA for layer {target[0]} {target[1]}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                f"do not have rank {rank}"
            )
        adapter.updates[target] = (a, b)
    if not adapter.updates:
        raise WeightsError("LoRA adapter has no lora_A/lora_B tensors")
    return adapter


def load_lora(path: str | Path) -> LoraAdapter:
    """Read a PEFT-style adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_file, weights_file):
        if not f.is_file():
            raise WeightsError(f"LoRA adapter {path}: missing {f.name}")
    try:
        config = json.loads(config_file.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise WeightsError(f"LoRA adapter {path}: adapter_config.json needs numeric 'r' and 'lora_alpha' ({e})") from e
    try:
        state = load_file(weights_file)
    except Exception as e:  # safetensors raises several types for corrupt files
        raise WeightsError(f"LoRA adapter {path}: cannot read {weights_file.name}: {e}") from e
    return parse_lora_state(state, rank, alpha)


def check_head_layers(adapter: LoraAdapter, trunk_layers: int, n_layers: int) -> None:
    """Refuse an adapter that touches a trunk layer (shared by every head) or a layer the model lacks."""
    for layer, _ in adapter.updates:
        if not trunk_layers <= layer < n_layers:
            raise WeightsError(
                f"LoRA targets layer {layer}, but heads hold layers {trunk_layers}..{n_layers - 1}; "
                "the trunk is shared and cannot take a per-head adapter"
            )


def checked_delta(adapter: LoraAdapter, layer: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The adapter's dense update (out, in) of one linear layer, refused unless the layer is ``shape`` (out, in)."""
    delta = adapter.delta(layer, name)
    if tuple(delta.shape) != tuple(shape):
        raise WeightsError(f"LoRA update for layer {layer} {name} is {tuple(delta.shape)}, the layer is {tuple(shape)}")
    return delta


@torch.no_grad()
def merge_lora(model: HydraTransformer, head: int, adapter: LoraAdapter) -> None:
    """Add the adapter's updates to head ``head``'s own weights (other heads and the trunk untouched)."""
    model.require_float_weights("merging a LoRA adapter")
    if not 0 <= head < model.n_heads:
        raise ValueError(f"head {head} out of range for {model.n_heads} heads")
    trunk_layers = model.config.trunk_layers
    check_head_layers(adapter, trunk_layers, model.base_config.n_layers)
    for layer, name in adapter.updates:
        target = linear_weight(model.heads[layer - trunk_layers], head, name)  # type: ignore[arg-type]
        delta = checked_delta(adapter, layer, name, tuple(target.t().shape))
        target.add_(delta.t().to(target.dtype))
