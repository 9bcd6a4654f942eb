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

    A base checkpoint is loaded as one tower (its heads would all be clones); a saved ensemble or a trained
    preset keeps its heads.
    """
    if isinstance(model, HydraTransformer):
        vocab = model.base_config.vocab_size
        return LoadedVerifier(model, type(model).__name__, vocab_limit(tokenizer, vocab) if tokenizer else vocab)
    from olmo_tap.weights.sources import resolve
    from olmo_tap.weights.tokenizer import load_tokenizer

    resolved = resolve(model)
    n_heads = None if resolved.has_own_heads else 1
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


# Positions projected to full-vocabulary logits at a time: bounds peak memory whatever the sequence length
# (heads x block x vocab fp32: 5 x 64 x 49152 x 4 B = 63 MB for the embedded default; OLMo-2: 128 MB).
LOGIT_BLOCK = 64


@torch.no_grad()
def teacher_forced_hidden(
    model: HydraTransformer,
    prompt_ids: list[int],
    output_ids: list[int],
    head_indices: list[int],
    include_next: bool = False,
) -> torch.Tensor:
    """One uncached pass of the trunk and the selected heads over prompt + output.

    Returns each head's pre-norm hidden state (n_heads, 1 + positions, d_model): [:, 0] at the last prompt
    position (the uncertainty head's witness, and what predicts the first output token), then one per output
    position. ``project_block`` turns a block of them into logits."""
    ids = prompt_ids + (output_ids if include_next else output_ids[:-1])
    tokens = torch.tensor([ids or prompt_ids], device=model.device)
    trunk = model.forward_trunk(tokens)
    # Only the positions that predict outputs go through the heads' last steps: the rest are never used.
    return model.head_hidden_states(trunk, head_indices)[:, 0, len(prompt_ids) - 1 :]


# Matrix products take another kernel, with another summation order, for a handful of rows (on x86 oneDNN and
# MKL: up to 3 rows come out 1 ulp off the same rows of a longer product). Projecting at least this many rows
# keeps each position's logits bitwise those of one pass over the whole sequence, however it is cut in blocks.
MIN_PROJECT_ROWS = 16


@torch.no_grad()  # the lm_head is a parameter: with autograd on, every block would carry a graph (and skip oneDNN)
def project_block(model: HydraTransformer, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Logits (n_heads, stop - start, vocab) fp32 of positions [start, stop) of ``teacher_forced_hidden``,
    computed over a window of at least ``MIN_PROJECT_ROWS`` positions (widened backwards, then forwards; the
    whole sequence when it is shorter), so that they do not depend on how the sequence is cut in blocks."""
    lo = max(0, min(start, stop - MIN_PROJECT_ROWS))
    hi = min(hidden.size(1), max(stop, lo + MIN_PROJECT_ROWS))
    return model.project(hidden[:, None, lo:hi])[:, 0].float()[:, start - lo : stop - lo]


def teacher_forced_logits(
    model: HydraTransformer,
    prompt_ids: list[int],
    output_ids: list[int],
    head_indices: list[int],
    include_next: bool = False,
) -> torch.Tensor:
    """Logits (n_heads, positions, vocab) fp32 for each output position (and, with ``include_next``, the
    position after the last output token), all at once: for short sequences (tests, experiments); long ones
    go block by block (``project_block``)."""
    n_out = len(output_ids) + int(include_next)
    if n_out == 0:
        return torch.empty(len(head_indices), 0, model.base_config.vocab_size)
    hidden = teacher_forced_hidden(model, prompt_ids, output_ids, head_indices, include_next)
    return project_block(model, hidden, 0, n_out)
