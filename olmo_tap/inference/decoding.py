"""Plain decoding with one head and the KV cache: the baseline the jury is compared with."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.sampling import Purpose, check_temperature, filter_logits, sample_from_logits


@torch.no_grad()
def decode_single_head(
    model: HydraTransformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    head: int = 0,
    temperature: float | None = 0.0,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """Yield tokens one at a time from head ``head``; the stop token, if reached, is yielded last.

    Token ``t`` of the sequence (absolute position) uses the noise of (seed, t, SAMPLE), so a
    response can be re-checked by teacher forcing. ``vocab_limit`` masks padding rows of the
    embedding that have no token.
    """
    temperature = check_temperature(temperature)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    total = len(prompt_ids) + max_new_tokens
    if total > model.base_config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {model.base_config.max_seq_len} tokens"
        )
    model.init_kv_cache(1, total)
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    logits = model(ids, head_indices=[head], last_token_only=True)[0, 0, -1]
    position = len(prompt_ids)
    for _ in range(max_new_tokens):
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        token = sample_from_logits(filter_logits(logits, top_k, top_p), temperature, seed, position, Purpose.SAMPLE)
        yield token
        if token in stop_ids or position + 1 >= total:
            return
        logits = model(torch.tensor([[token]], device=model.device), head_indices=[head], last_token_only=True)[
            0, 0, -1
        ]
        position += 1
