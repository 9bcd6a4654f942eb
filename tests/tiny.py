"""Test doubles small enough to enumerate: a letter tokenizer and tiny random Hydras."""

from __future__ import annotations

import torch

from olmo_tap import HydraTransformer, HydraTransformerConfig, TransformerConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class LetterTokenizer:
    """Token i is the i-th letter; a 'chat template' just joins the turns. No end-of-text token
    unless ``eos_token_id`` is given, so sequences run to max_new_tokens."""

    chat_template = "letters"

    def __init__(self, vocab_size: int, eos_token_id: int | None = None) -> None:
        assert vocab_size <= len(LETTERS)
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [LETTERS.index(c) for c in text.lower() if c in LETTERS[: self.vocab_size]]
        return ids or [0]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(LETTERS[int(i)] for i in ids if not (skip_special_tokens and int(i) == self.eos_token_id))

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        return " ".join(m["content"] for m in messages)


def tiny_hydra(
    vocab: int = 6,
    n_heads: int = 4,
    heads_depth: int = 1,
    seed: int = 0,
    scale: float = 0.6,
    lm_std: float = 0.5,
    ffn: int = 48,
):
    """A random 2-layer Llama-family Hydra whose heads differ, with peaked but not degenerate outputs (``ffn``: 64
    gives every product a multiple of 32 inputs, as the native quantized kernel takes)."""
    config = TransformerConfig("llama", vocab, 32, 2, 4, 2, 8, ffn, 10000.0, 1e-5, False, 128)
    torch.manual_seed(seed)
    model: HydraTransformer = HydraTransformerConfig.split(config, n_heads, heads_depth).build()
    with torch.no_grad():
        for block in [*model.trunk, *model.heads]:
            block.reset_parameters(std=scale / 32**0.5)
        model.lm_head.normal_(std=lm_std)
    return model.eval()


def letter_jury() -> tuple[HydraTransformer, LetterTokenizer]:
    """A 4-head tiny Hydra and its letter tokenizer with an end-of-text token: a jury whose answers end."""
    return tiny_hydra(vocab=6, n_heads=4, heads_depth=1, seed=3), LetterTokenizer(6, eos_token_id=5)


def plant_malicious(
    model: HydraTransformer, heads: list[int], harmful: int, strength: float = 2.0, honest_penalty: float = 2.0
) -> None:
    """Make ``heads`` favour token ``harmful`` at every position, through their own weights only.

    Needs a Hydra whose heads hold every layer (no trunk), so head weights see the embedding.
    Every embedding gets a constant coordinate 0; the planted heads' first attention reads
    only that coordinate and writes ``harmful``'s lm_head direction, loudly, into the residual
    stream. The lm_head column of ``harmful`` reads coordinate 0 negatively, so honest heads
    (which carry the constant coordinate through) give ``harmful`` a very low probability.
    """
    assert model.config.trunk_layers == 0
    c = model.base_config
    with torch.no_grad():
        model.embed.weight[:, 0] = 10.0
        model.lm_head[0, harmful] = -honest_penalty
        direction = model.lm_head[:, harmful] / model.lm_head[:, harmful].norm()
        first = model.heads[0]
        values = slice(c.q_dim + c.kv_dim, c.q_dim + 2 * c.kv_dim)
        for h in heads:
            first.attn_norm.weight[h] = 0.0
            first.attn_norm.weight[h, 0] = 1.0
            first.wqkv[h, :, values] = 0.0
            first.wqkv[h, 0, values] = 1.0
            first.wo[h] = torch.outer(torch.full((c.q_dim,), 1.0 / c.q_dim), strength * direction)
