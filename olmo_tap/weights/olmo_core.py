"""The original OLMo-core state layout (the Hydra's source system) -> Hugging Face tensor names.

Only names change; tensors are passed through (OLMo-core and HF both store linear weights as (out, in)).
"""

from __future__ import annotations

import re

import torch

from olmo_tap.weights.errors import WeightsError

_GLOBAL_NAMES = {
    "embeddings.weight": "model.embed_tokens.weight",
    "lm_head.norm.weight": "model.norm.weight",  # the final norm belongs to OLMo-core's lm_head module
    "lm_head.w_out.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attention.w_q.weight": "self_attn.q_proj.weight",
    "attention.w_k.weight": "self_attn.k_proj.weight",
    "attention.w_v.weight": "self_attn.v_proj.weight",
    "attention.w_out.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    # OLMo-2 normalises sublayer outputs, so these sit after attention / the FFN.
    "attention_norm.weight": "post_attention_layernorm.weight",
    "feed_forward_norm.weight": "post_feedforward_layernorm.weight",
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_OLMO_CORE_ROOTS = ("blocks.", "embeddings.", "lm_head.")


def _strip_model_prefix(key: str) -> str:
    """Some OLMo-core exports nest the model under ``model.``; HF names also start with ``model.`` but never
    continue with an OLMo-core root, so stripping is unambiguous."""
    rest = key.removeprefix("model.")
    return rest if rest != key and rest.startswith(_OLMO_CORE_ROOTS) else key


def is_olmo_core_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` uses OLMo-core names (and no HF names)."""
    keys = [_strip_model_prefix(k) for k in state]
    has_core = any(k == "embeddings.weight" or k.startswith("blocks.") for k in keys)
    has_hf = any(k.startswith(("model.layers.", "model.embed_tokens.")) for k in keys)
    return has_core and not has_hf


def olmo_core_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OLMo-core state dict to HF names; unknown keys are an error (nothing is silently dropped)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        name = _strip_model_prefix(key)
        hf_name = _GLOBAL_NAMES.get(name)
        match = _BLOCK_RE.fullmatch(name)
        if hf_name is None and match and match.group(2) in _BLOCK_NAMES:
            hf_name = f"model.layers.{int(match.group(1))}.{_BLOCK_NAMES[match.group(2)]}"
        if hf_name is None:
            unknown.append(key)
            continue
        if hf_name in out:
            raise WeightsError(f"OLMo-core state maps two keys onto {hf_name!r} (one of them is {key!r})")
        out[hf_name] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise WeightsError(
            f"OLMo-core state has {len(unknown)} unknown key(s): {shown}; known: embeddings.weight, "
            f"blocks.N.{{{', '.join(_BLOCK_NAMES)}}}, lm_head.norm.weight, lm_head.w_out.weight"
        )
    return out
