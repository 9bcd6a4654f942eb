"""The verifier's side of a replay: a loaded model and its teacher-forced, full-vocabulary logits.

One forward pass over prompt + claimed output gives, for every output position, the logits the generator
saw there (up to floating-point drift between a KV-cached decode and one batched pass). Nothing is
truncated to the top-k: every metric is computed on the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.weights.tokenizer import vocab_limit


@dataclass
class LoadedVerifier:
    model: HydraTransformer
    name: str
    vocab_limit: int  # tokens the tokenizer knows: what olmo-tap's samplers draw over (<= logits' width)

    @property
    def vocab_size(self) -> int:
        return self.model.base_config.vocab_size

    @property
    def context(self) -> int:
        return self.model.base_config.max_seq_len


def load_verifier(
    model: str | Path | HydraTransformer,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> LoadedVerifier:
    """A model to verify with: an already loaded Hydra, or any source the loader accepts.

    A base checkpoint is loaded as one tower (its heads would all be clones); a saved ensemble keeps its heads.
    """
    if isinstance(model, HydraTransformer):
        vocab = model.base_config.vocab_size
        return LoadedVerifier(model, type(model).__name__, vocab_limit(tokenizer, vocab) if tokenizer else vocab)
    from olmo_tap.weights.sources import resolve
    from olmo_tap.weights.tokenizer import load_tokenizer

    resolved = resolve(model)
    n_heads = None if resolved.kind == "ensemble_dir" else 1
    hydra = HydraTransformer.from_pretrained(resolved, n_heads=n_heads, dtype=dtype, device=device)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolved, progress=progress)
    return LoadedVerifier(hydra, str(model), vocab_limit(tokenizer, hydra.base_config.vocab_size))


def check_token_ids(ids: list[int], vocab_size: int, what: str) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"{what}: token id {bad} is outside the model's vocabulary [0, {vocab_size}) "
            "(were these ids made with another tokenizer?)"
        )


@torch.no_grad()
def teacher_forced_pass(
    model: HydraTransformer,
    prompt_ids: list[int],
    output_ids: list[int],
    head_indices: list[int],
    include_next: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One uncached pass of the trunk and the selected heads over prompt + output.

    Returns logits (n_heads, positions, vocab) fp32 for each output position (and, with ``include_next``, the
    position after the last output token), and each head's pre-norm hidden state (n_heads, d_model) at the
    last prompt position (the uncertainty head's witness)."""
    ids = prompt_ids + (output_ids if include_next else output_ids[:-1])
    n_out = len(output_ids) + int(include_next)
    tokens = torch.tensor([ids or prompt_ids], device=model.device)
    trunk = model.forward_trunk(tokens, use_cache=False)
    # Only the positions that predict outputs go through the lm_head: the prompt's other logits are never used.
    hidden = model.head_hidden_states(trunk, head_indices, use_cache=False)[:, :, len(prompt_ids) - 1 :]
    witness = hidden[:, 0, 0]
    if n_out == 0:
        return torch.empty(len(head_indices), 0, model.base_config.vocab_size), witness
    return model.project(hidden[:, :, :n_out])[:, 0].float(), witness


def teacher_forced_logits(
    model: HydraTransformer,
    prompt_ids: list[int],
    output_ids: list[int],
    head_indices: list[int],
    include_next: bool = False,
) -> torch.Tensor:
    """The logits of ``teacher_forced_pass``."""
    return teacher_forced_pass(model, prompt_ids, output_ids, head_indices, include_next)[0]
