"""A LoRA adapter for one head of a Hydra, and that head's forward pass with the adapter applied.

Why an adapter of our own rather than peft: the Hydra does not hold a head's linear layers as
``nn.Linear`` modules. Each head block stores one weight per kind for *all* heads, stacked and fused:
``wqkv`` (n_heads, d_model, q + 2 kv), ``wo``, ``w13`` (gate and up side by side), ``w2``. peft's
module-level LoRA has nothing to wrap there. peft's ``target_parameters`` (LoRA on 3-D expert
parameters) does take such a stack, but it adapts every slice of it at once, gives a fused q/k/v or
gate/up weight one LoRA with a shared ``A`` (not three independent ones), and saves under our
internal parameter names, which neither ``olmo_tap.weights.lora`` nor a PEFT user with the Hugging
Face model would recognise. Rebuilding a head as transformers modules so that plain peft applies
would add a second implementation of the head's forward, per family, to keep equal to ours.

So the adapter is a small module of ours with PEFT's conventions: per targeted linear ``lora_A``
(r, in) initialised Kaiming-uniform (a = sqrt(5)), ``lora_B`` (out, r) initialised to zero, update
``W += (alpha / r) * B @ A``, no dropout and no bias. It is saved in PEFT's file layout
(``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{L}.mlp.gate_proj.lora_A.weight``, layer numbers of the base
model): ``olmo_tap.weights.lora`` merges it into one head and peft's ``PeftModel`` loads it onto
the Hugging Face model of the same checkpoint (both tested).

The forward pass reuses the model's own ``Block.forward`` through ``torch.func.functional_call``
on a weightless single-tower block: the head's slice of every stacked weight, plus the adapter's
update, is passed in as that block's parameters. The model's tensors are only read, never written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from olmo_tap.hydra import HydraTransformer
from olmo_tap.model.config import TransformerConfig
from olmo_tap.model.kv_cache import Rows
from olmo_tap.model.layers import Block, rope_for_positions
from olmo_tap.weights.layout import LINEAR_NAMES
from olmo_tap.weights.lora import LoraAdapter

# The original system's choice: LoRA on the feed-forward weights only (OLMo-core w1, w3, w2).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

# Which fused Block parameter holds each HF linear, in what order along its output dimension.
_FUSED: dict[str, tuple[str, ...]] = {
    "wqkv": ("q_proj", "k_proj", "v_proj"),
    "wo": ("o_proj",),
    "w13": ("gate_proj", "up_proj"),
    "w2": ("down_proj",),
}


def linear_shape(config: TransformerConfig, name: str) -> tuple[int, int]:
    """(in_features, out_features) of HF linear ``name`` in one layer of ``config``."""
    c = config
    shapes = {
        "q_proj": (c.d_model, c.q_dim),
        "k_proj": (c.d_model, c.kv_dim),
        "v_proj": (c.d_model, c.kv_dim),
        "o_proj": (c.q_dim, c.d_model),
        "gate_proj": (c.d_model, c.ffn_hidden),
        "up_proj": (c.d_model, c.ffn_hidden),
        "down_proj": (c.ffn_hidden, c.d_model),
    }
    return shapes[name]


def check_targets(
    model: HydraTransformer, target_modules: Sequence[str], target_layers: Sequence[int] | None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Validated (modules, base-model layer indices); ``target_layers`` None means every head layer."""
    modules = tuple(dict.fromkeys(target_modules))
    if not modules:
        raise ValueError("no LoRA target modules given")
    unknown = [m for m in modules if m not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"unknown LoRA target module(s) {unknown}; known: {', '.join(LINEAR_NAMES)}")
    first, n_layers = model.config.trunk_layers, model.base_config.n_layers
    head_layers = tuple(range(first, n_layers))
    if target_layers is None:
        return modules, head_layers
    layers = tuple(sorted(set(int(x) for x in target_layers)))
    if not layers:
        raise ValueError("no LoRA target layers given")
    bad = [x for x in layers if x not in head_layers]
    if bad:
        raise ValueError(
            f"unknown target layer(s) {bad}: heads hold base layers {first}..{n_layers - 1} "
            f"(layers 0..{first - 1} are the shared trunk, which a per-head adapter cannot change)"
        )
    return modules, layers


def head_block_params(model: HydraTransformer, head: int, layer: int) -> dict[str, torch.Tensor]:
    """Head ``head``'s slice (a view, detached) of every parameter of the block holding base layer ``layer``."""
    model.require_float_weights("training a head")
    block = model.heads[layer - model.config.trunk_layers]
    params = {name: getattr(block, name)[head : head + 1].detach() for name in _FUSED}
    for norm_name, module in block.named_modules():
        if norm_name and hasattr(module, "weight"):  # attn_norm, ffn_norm (+ q_norm, k_norm for olmo2)
            params[f"{norm_name}.weight"] = module.weight[head : head + 1].detach()
    return params


def _key(layer: int, name: str, half: str) -> str:
    return f"layer{layer}_{name}_{half}"


class HeadAdapter(nn.Module):
    """LoRA updates for the linears ``target_modules`` of base layers ``target_layers`` (head layers)."""

    def __init__(
        self,
        config: TransformerConfig,
        target_layers: Sequence[int],
        target_modules: Sequence[str],
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        self.rank, self.alpha = rank, float(alpha)
        self.target_layers = tuple(target_layers)
        self.target_modules = tuple(target_modules)
        self.lora = nn.ParameterDict()
        for layer in self.target_layers:
            for name in self.target_modules:
                fan_in, fan_out = linear_shape(config, name)
                a = torch.empty(rank, fan_in)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's default init of lora_A
                self.lora[_key(layer, name, "A")] = nn.Parameter(a)
                self.lora[_key(layer, name, "B")] = nn.Parameter(torch.zeros(fan_out, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def pair(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora[_key(layer, name, "A")], self.lora[_key(layer, name, "B")]

    def delta_in_out(self, layer: int, name: str) -> torch.Tensor:
        """The update of one linear in the model's (in, out) layout: scale * (B @ A)^T."""
        a, b = self.pair(layer, name)
        return self.scale * (a.t() @ b.t())

    def block_params(self, model: HydraTransformer, head: int, layer: int) -> dict[str, torch.Tensor]:
        """Parameters of a single-tower Block equal to head ``head`` of base layer ``layer`` plus this adapter."""
        params = head_block_params(model, head, layer)
        if layer not in self.target_layers:
            return params
        for fused, names in _FUSED.items():
            if not any(n in self.target_modules for n in names):
                continue
            base = params[fused]
            pieces = []
            for name in names:
                if name in self.target_modules:
                    pieces.append(self.delta_in_out(layer, name))
                else:
                    pieces.append(torch.zeros(linear_shape(model.base_config, name), device=base.device))
            delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            params[fused] = base + delta.to(base.dtype).unsqueeze(0)
        return params

    def to_lora_adapter(self) -> LoraAdapter:
        """Detached copy in the form ``olmo_tap.weights.lora.merge_lora`` takes."""
        adapter = LoraAdapter(self.rank, self.alpha)
        for layer in self.target_layers:
            for name in self.target_modules:
                a, b = self.pair(layer, name)
                adapter.updates[(layer, name)] = (a.detach().clone().cpu(), b.detach().clone().cpu())
        return adapter

    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's names for a causal LM (what ``PeftModel.save_pretrained`` writes)."""
        state = {}
        for layer in self.target_layers:
            for name in self.target_modules:
                sub = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                prefix = f"base_model.model.model.layers.{layer}.{sub}.{name}"
                a, b = self.pair(layer, name)
                state[f"{prefix}.lora_A.weight"] = a.detach().contiguous().cpu()
                state[f"{prefix}.lora_B.weight"] = b.detach().contiguous().cpu()
        return state

    def save(
        self, directory: str | Path, base_model: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Path:
        """Write a PEFT-layout adapter directory (readable by ``olmo_tap.weights.lora.load_lora`` and peft)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": list(self.target_modules),
            "layers_to_transform": list(self.target_layers),
            "inference_mode": True,
        }
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(self.peft_state(), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        if metadata:
            (directory / "olmo_tap_training.json").write_text(json.dumps(metadata, indent=2))
        return directory

    @classmethod
    def from_lora(cls, config: TransformerConfig, lora: LoraAdapter) -> HeadAdapter:
        """Rebuild a trainable adapter from a loaded ``LoraAdapter`` (every layer must target the same modules)."""
        layers = sorted({layer for layer, _ in lora.updates})
        modules = [n for n in LINEAR_NAMES if any(name == n for _, name in lora.updates)]
        if len(lora.updates) != len(layers) * len(modules):
            raise ValueError("the adapter does not target the same modules in every layer")
        adapter = cls(config, layers, modules, lora.rank, lora.alpha)
        with torch.no_grad():
            for (layer, name), (a, b) in lora.updates.items():
                adapter.lora[_key(layer, name, "A")].copy_(a)
                adapter.lora[_key(layer, name, "B")].copy_(b)
        return adapter


class AdaptedHead:
    """Runs head ``head`` of ``model`` with an adapter on trunk hidden states, uncached, differentiably."""

    def __init__(self, model: HydraTransformer, head: int, adapter: HeadAdapter | None) -> None:
        if not 0 <= head < model.n_heads:
            raise ValueError(f"head {head} out of range for {model.n_heads} heads")
        self.model, self.head, self.adapter = model, head, adapter
        # Weightless single-tower blocks whose parameters are supplied at call time.
        with torch.device("meta"):
            self._blocks = [Block(model.base_config, 1) for _ in model.heads]

    def hidden(self, trunk_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-norm hidden states (batch, seq, d_model) of the head on ``trunk_states`` (batch, seq, d_model),
        with ``residual`` added to the head's input as in ``HydraTransformer.head_hidden_states``."""
        model = self.model
        x = trunk_states.to(model.dtype)
        if residual is not None:
            x = x + residual.to(x.dtype)
        batch, seq, d_model = x.shape
        rope = rope_for_positions(*model.rope_upto(seq), model.base_config, slice(0, seq), model.dtype)
        rows = Rows.uniform(batch, 0, seq)
        x = x.reshape(1, batch * seq, d_model)
        first = model.config.trunk_layers
        for i, block in enumerate(self._blocks):
            layer = first + i
            if self.adapter is None:
                params = head_block_params(model, self.head, layer)
            else:
                params = self.adapter.block_params(model, self.head, layer)
            x = functional_call(block, params, (x, slice(0, 1), rows, rope, None))
        return x.view(batch, seq, d_model)
