"""``verify_outputs``: token-difr's entry point, on any device, for vLLM's sampler and olmo-tap's own."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.sampling import check_temperature, head_for_seed
from olmo_tap.verify import replay
from olmo_tap.verify.records import SamplingMethod, TokenMetrics, TokenSequence
from olmo_tap.verify.replay import LoadedVerifier, check_token_ids, load_verifier, project_block, teacher_forced_hidden
from olmo_tap.verify.scoring import (
    compute_metrics_summary,
    olmo_tap_gumbels,
    score_tokens,
    vllm_exponential_rows,
    vllm_generator,
)


def check_filters(top_k: int, top_p: float) -> tuple[int, float]:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an integer (<= 0 means off), got {top_k!r}")
    top_p = float(top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 means off), got {top_p}")
    return top_k, top_p


def verify_outputs(
    outputs: list[TokenSequence],
    model_name: str | Path | HydraTransformer,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    max_model_len: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    sampling_method: SamplingMethod | str = SamplingMethod.VLLM_GUMBEL_MAX,
    verbose: bool = True,
    head: int | None = None,
    tokenizer: Any = None,
    check_stop: Callable[[], None] | None = None,
) -> list[list[TokenMetrics]]:
    """Replay each claimed output through a trusted model and score every token (one list per sequence).

    :param model_name: anything the loader accepts (preset, directory, hub id, GGUF, saved ensemble) or an
        already loaded Hydra (then pass its ``tokenizer`` too for olmo-tap's sampler, which draws over the
        tokenizer's vocabulary).
    :param temperature: as used in generation; 0 (or None) is greedy.
    :param top_k, top_p: as used in generation; top_k <= 0 and top_p = 1 are off.
    :param seed: the generation seed (a sequence's own ``seed`` wins); only unused at temperature 0.
    :param max_model_len: refuse sequences longer than this (default: the model's context).
    :param dtype, device: of a model loaded here (default fp32 on CPU, bf16 on CUDA).
    :param sampling_method: VLLM_GUMBEL_MAX (token-difr's default) or OLMO_TAP (olmo-tap's own samplers).
    :param head: for a Hydra with several text heads, the head to verify against. Default: the head
        olmo-tap's single-head decoder uses for that seed (a base checkpoint is loaded as one tower).
    :param check_stop: called between sequences and between blocks of positions; may raise to stop the work
        (a service's deadline, a client that left).

    Logits are projected and scored ``replay.LOGIT_BLOCK`` positions at a time, so peak memory does not grow
    with the sequence's length beyond the hidden states.
    """
    method = SamplingMethod.parse(sampling_method)
    temperature = check_temperature(temperature)
    top_k, top_p = check_filters(top_k, top_p)
    if not isinstance(outputs, list) or not all(isinstance(o, TokenSequence) for o in outputs):
        raise ValueError("outputs must be a list of TokenSequence")
    if temperature > 0 and seed is None and any(o.seed is None for o in outputs):
        raise ValueError("sampled outputs (temperature > 0) need the generation seed")
    verifier = load_verifier(model_name, tokenizer=tokenizer, dtype=dtype, device=device, progress=verbose)
    limit = verifier.context if max_model_len is None else min(int(max_model_len), verifier.context)
    n_heads = verifier.model.n_text_heads
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range for a model with {n_heads} text heads")
    for i, sequence in enumerate(outputs):
        check_token_ids(sequence.prompt_token_ids, verifier.vocab_size, f"sequence {i} prompt")
        check_token_ids(sequence.output_token_ids, verifier.vocab_size, f"sequence {i} output")
        if not sequence.prompt_token_ids:
            raise ValueError(f"sequence {i}: prompt_token_ids is empty (the model needs a context)")
        length = len(sequence.prompt_token_ids) + len(sequence.output_token_ids)
        if length > limit:
            raise ValueError(f"sequence {i}: {length} tokens exceed max_model_len {limit}")
    results = []
    progress = tqdm(outputs, desc="verifying", unit="seq", disable=not verbose, file=sys.stderr)
    for sequence in progress:
        if check_stop is not None:
            check_stop()
        sequence_seed = sequence.seed if sequence.seed is not None else seed
        chosen = head if head is not None else head_for_seed(sequence_seed or 0, n_heads)
        results.append(
            verify_sequence(
                verifier, sequence, chosen, temperature, top_k, top_p, sequence_seed, method, check_stop=check_stop
            )
        )
    if verbose:
        summary = compute_metrics_summary(results)
        rate = summary["exact_match_rate"]
        shown = "n/a" if rate is None else f"{rate:.2%}"
        print(f"verified {summary['total_tokens']} tokens: exact match {shown}", file=sys.stderr)
    return results


@torch.no_grad()
def verify_sequence(
    verifier: LoadedVerifier,
    sequence: TokenSequence,
    head: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    method: SamplingMethod,
    check_stop: Callable[[], None] | None = None,
) -> list[TokenMetrics]:
    """Metrics of one sequence, scored block by block (``check_stop`` runs before each block).

    Every metric is per position, and each sampler's noise is per position too (olmo-tap's keyed by absolute
    position; vLLM's rows drawn in order from one generator kept across blocks), so the blocks give exactly
    the metrics of one pass over the whole sequence."""
    prompt, output = sequence.prompt_token_ids, sequence.output_token_ids
    if not output:
        return []
    model = verifier.model
    # olmo-tap samples over the tokenizer's vocabulary, keyed by absolute position.
    olmo_tap = method is SamplingMethod.OLMO_TAP
    width = min(verifier.vocab_limit, verifier.vocab_size) if olmo_tap else verifier.vocab_size
    if max(output) >= width:
        raise ValueError(f"claimed token {max(output)} is outside the sampler's vocabulary {width}")
    hidden = teacher_forced_hidden(model, prompt, output, [head])
    generator = vllm_generator(int(seed or 0), model.device) if temperature > 0 and not olmo_tap else None
    metrics: list[TokenMetrics] = []
    for start in range(0, len(output), replay.LOGIT_BLOCK):
        if check_stop is not None:
            check_stop()
        stop = min(start + replay.LOGIT_BLOCK, len(output))
        logits = project_block(model, hidden, start, stop)[0, :, :width]
        noise = None
        if temperature > 0:
            if olmo_tap:
                noise = olmo_tap_gumbels(len(prompt) + start, stop - start, width, int(seed or 0))
            else:
                noise = vllm_exponential_rows(generator, stop - start, width, logits.device)
        claimed = torch.tensor(output[start:stop], device=logits.device)
        metrics += score_tokens(
            logits, claimed, temperature=temperature, top_k=top_k, top_p=top_p, method=method, noise=noise
        )
    return metrics
