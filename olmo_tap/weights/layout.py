"""Between Hugging Face tensor names and the Hydra's fused, stacked parameters.

Checkpoints of every format are first read into HF names (``model.layers.{i}.
self_attn.q_proj.weight`` ...); this module is the one place that knows how
those map onto ``Block.wqkv`` / ``wo`` / ``w13`` / ``w2`` (stored ``(in, out)``)
and the norms. Loading, LoRA merging and exporting one head's tower all use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.model.layers import Block
from olmo_tap.weights.errors import WeightsError

# HF linear name -> (fused parameter, which part of it)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_weight(block: Block, tower: int, name: str) -> torch.Tensor:
    """A view, shaped (in, out), of HF linear ``name`` of ``tower`` inside ``block``'s fused weights.

    Writing to the view (under no_grad) writes the model's parameter and bumps its version, which
    tells the prepacked inference copies to rebuild.
    """
    c = block.config
    if name in ("q_proj", "k_proj", "v_proj"):
        bounds = {"q_proj": (0, c.q_dim), "k_proj": (c.q_dim, c.kv_dim), "v_proj": (c.q_dim + c.kv_dim, c.kv_dim)}
        start, size = bounds[name]
        return block.wqkv[tower, :, start : start + size]
    if name in ("gate_proj", "up_proj"):
        start = 0 if name == "gate_proj" else c.ffn_hidden
        return block.w13[tower, :, start : start + c.ffn_hidden]
    if name == "o_proj":
        return block.wo[tower]
    if name == "down_proj":
        return block.w2[tower]
    raise WeightsError(f"unknown linear layer {name!r}; known: {', '.join(LINEAR_NAMES)}")


def _norm_names(family: str) -> dict[str, str]:
    """Block norm parameter -> HF norm name, per family."""
    if family == "olmo2":
        return {
            "attn_norm": "post_attention_layernorm",
            "ffn_norm": "post_feedforward_layernorm",
            "q_norm": "self_attn.q_norm",
            "k_norm": "self_attn.k_norm",
        }
    return {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_linear_name(layer: int, name: str) -> str:
    """Full HF tensor name of linear ``name`` in base layer ``layer``."""
    sub = "mlp." if name in ("gate_proj", "up_proj", "down_proj") else "self_attn."
    return f"{_layer_prefix(layer)}{sub}{name}.weight"


def _block_and_towers(model: HydraTransformer, layer: int) -> tuple[Block, range]:
    """The block holding base layer ``layer`` and the towers it fills (all heads for head layers)."""
    trunk_layers = model.config.trunk_layers
    if layer < trunk_layers:
        return model.trunk[layer], range(1)  # type: ignore[return-value]
    return model.heads[layer - trunk_layers], range(model.n_heads)  # type: ignore[return-value]


@torch.no_grad()
def load_base_state(model: HydraTransformer, state: dict[str, torch.Tensor]) -> None:
    """Fill ``model`` from a single-tower HF-named state dict, cloning head layers into every head.

    Embedding rows beyond the checkpoint's vocabulary (padding) stay zero.
    """
    c = model.base_config

    def take(name: str) -> torch.Tensor:
        try:
            return state[name]
        except KeyError:
            raise WeightsError(f"checkpoint is missing tensor {name!r}") from None

    embed = take("model.embed_tokens.weight")
    if embed.size(1) != c.d_model or embed.size(0) > c.vocab_size:
        raise WeightsError(
            f"embedding of shape {tuple(embed.shape)} does not fit vocab {c.vocab_size} x d_model {c.d_model}"
        )
    model.embed.weight.zero_()
    model.embed.weight[: embed.size(0)] = embed
    lm_head = embed if c.tie_embeddings else take("lm_head.weight")
    model.lm_head.zero_()
    model.lm_head[:, : lm_head.size(0)] = lm_head.t()
    load_norms(model, take)
    for layer in range(c.n_layers):
        block, towers = _block_and_towers(model, layer)
        for name in LINEAR_NAMES:
            weight = take(hf_linear_name(layer, name))
            for tower in towers:
                target = linear_weight(block, tower, name)
                if weight.t().shape != target.shape:
                    raise WeightsError(
                        f"{hf_linear_name(layer, name)} has shape {tuple(weight.shape)}, "
                        f"expected {tuple(target.t().shape)} for this config"
                    )
                target.copy_(weight.t())


@torch.no_grad()
def load_norms(model: HydraTransformer, take: Callable[[str], torch.Tensor]) -> None:
    """Fill every norm of ``model`` (the final one, each block's, cloned into every head) from ``take(HF name)``."""
    c = model.base_config
    model.norm.weight.copy_(take("model.norm.weight"))
    norms = _norm_names(c.family)
    for layer in range(c.n_layers):
        block, towers = _block_and_towers(model, layer)
        for attr, hf_name in norms.items():
            getattr(block, attr).weight[towers.start : towers.stop] = take(_layer_prefix(layer) + hf_name + ".weight")


@torch.no_grad()
def tower_state(model: HydraTransformer, head: int) -> dict[str, torch.Tensor]:
    """The single-tower HF-named state dict of trunk + ``head`` (what a plain model would hold)."""
    c = model.base_config
    if not 0 <= head < model.n_heads:
        raise ValueError(f"head {head} out of range for {model.n_heads} heads")
    model.require_float_weights("exporting a tower's weights")
    state = {
        "model.embed_tokens.weight": model.embed.weight.clone(),
        "model.norm.weight": model.norm.weight.clone(),
    }
    if not c.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.t().contiguous()
    norms = _norm_names(c.family)
    for layer in range(c.n_layers):
        block, _ = _block_and_towers(model, layer)
        tower = 0 if layer < model.config.trunk_layers else head
        prefix = _layer_prefix(layer)
        for name in LINEAR_NAMES:
            state[hf_linear_name(layer, name)] = linear_weight(block, tower, name).t().contiguous()
        for attr, hf_name in norms.items():
            state[prefix + hf_name + ".weight"] = getattr(block, attr).weight[tower].clone()
    return state
