"""Scoring claimed tokens against full-vocabulary logits: the noise each sampler used, and token-difr's metrics.

Given the verifier's logits ``l`` at one position, the temperature ``T``, the filters and the sampler's noise,
the verifier samples the token itself and compares:

- ``exact_match``: its own sample equals the claimed token;
- ``prob``: the claimed token's probability under softmax(filtered l / T) (at T = 0: 1 for the argmax, else 0);
- ``margin``: max(l + T*G) - (l_claimed + T*G_claimed) over the kept tokens, with G the sampler's Gumbel
  noise (for vLLM's sampler G = -log E): 0 on a match, inf when the claimed token was filtered out;
- ``logit_rank``: how many (unfiltered) logits exceed the claimed token's;
- ``gumbel_rank``: how many of the sampler's own scores exceed the claimed token's (inf if filtered).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from olmo_tap.inference.sampling import NON_FINITE_CAUSE, NonFiniteLogitsError, Purpose, filter_logits, gumbel
from olmo_tap.verify.records import SamplingMethod, TokenMetrics


def vllm_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """vLLM V1's per-request generator: one on the logits' device, seeded once for the whole request."""
    return torch.Generator(device=device).manual_seed(int(seed))


def vllm_exponential_rows(
    generator: torch.Generator, n_positions: int, vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """The next ``n_positions`` fp32 exponential rows of ``generator``, drawn in order (row by row, as vLLM
    draws them step by step). Blocks drawn one after another from the same generator are exactly the rows of
    one long draw, so a verifier can score block by block with the same noise."""
    rows = [
        torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=generator)
        for _ in range(n_positions)
    ]
    return torch.stack(rows) if rows else torch.empty(0, vocab_size, dtype=torch.float32, device=device)


def vllm_exponentials(n_positions: int, vocab_size: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """vLLM V1's per-request noise: one generator on the logits' device, seeded once, then one fp32
    exponential row per output position, drawn in order (row by row, as vLLM draws them step by step)."""
    return vllm_exponential_rows(vllm_generator(seed, device), n_positions, vocab_size, device)


def olmo_tap_gumbels(first_position: int, n_positions: int, vocab_size: int, seed: int) -> torch.Tensor:
    """The Gumbel noise olmo-tap's plain samplers add at absolute positions first_position, first_position+1, ..."""
    rows = [gumbel(seed, first_position + k, Purpose.SAMPLE, vocab_size) for k in range(n_positions)]
    return torch.stack(rows) if rows else torch.empty(0, vocab_size)


def score_tokens(
    logits: torch.Tensor,
    claimed: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    method: SamplingMethod,
    noise: torch.Tensor | None,
) -> list[TokenMetrics]:
    """Metrics of the claimed tokens (positions,) given logits (positions, vocab).

    ``noise`` is the sampler's per-position noise (positions, vocab): exponentials E for VLLM_GUMBEL_MAX,
    Gumbels G for OLMO_TAP; unused (may be None) at temperature 0.
    """
    if logits.size(0) == 0:
        return []
    raw = logits.float()
    # NaN logits argmax to token 0: a verifier whose weights give them would agree with a claim of zeros
    broken = torch.isnan(raw).any(dim=1) | torch.isposinf(raw).any(dim=1)
    if bool(broken.any()):
        raise NonFiniteLogitsError(
            f"the verifying model's logits are not finite (NaN or infinity) at {int(broken.sum())} of {raw.size(0)} "
            f"positions: {NON_FINITE_CAUSE}"
        )
    filtered = filter_logits(raw, top_k, top_p)
    index = claimed.view(-1, 1).to(raw.device)
    claimed_filtered = filtered.gather(1, index).squeeze(1)
    kept = torch.isfinite(claimed_filtered)
    logit_rank = (raw > raw.gather(1, index)).sum(dim=1).float()
    if temperature == 0:
        predicted = filtered.argmax(dim=1)
        prob = (predicted == index.squeeze(1)).float()
        margin = filtered.max(dim=1).values - claimed_filtered
        gumbel_rank = (filtered > claimed_filtered.unsqueeze(1)).sum(dim=1).float()
    else:
        assert noise is not None, "sampled verification needs the sampler's noise"
        noise = noise.to(raw.device)
        probs = torch.softmax(filtered / temperature, dim=-1)
        prob = probs.gather(1, index).squeeze(1)
        if method is SamplingMethod.VLLM_GUMBEL_MAX:
            scores = probs / noise  # literally vLLM's rule, so ties and rounding behave as in vLLM
            g = -torch.log(noise)
        else:
            scores = filtered / temperature + noise  # literally olmo-tap's sample_from_logits
            g = noise
        predicted = scores.argmax(dim=1)
        gumbel_rank = (scores > scores.gather(1, index)).sum(dim=1).float()
        perturbed = filtered + temperature * g
        margin = perturbed.max(dim=1).values - perturbed.gather(1, index).squeeze(1)
    exact = predicted == index.squeeze(1)
    inf = torch.full_like(margin, math.inf)
    margin = torch.where(exact, torch.zeros_like(margin), torch.where(kept, margin, inf))
    gumbel_rank = torch.where(kept, gumbel_rank, inf)
    rows = zip(exact.tolist(), prob.tolist(), margin.tolist(), logit_rank.tolist(), gumbel_rank.tolist(), strict=True)
    return [TokenMetrics(bool(e), float(p), float(m), float(lr), float(gr)) for e, p, m, lr, gr in rows]


def compute_metrics_summary(results: list[list[TokenMetrics]]) -> dict[str, Any]:
    """Token-weighted means over every token of every sequence.

    Unlike token-difr, one filtered-out claimed token (infinite margin) does not turn the averages into inf:
    margins and gumbel ranks are averaged over finite values, and ``infinite_margin_rate`` says how many were
    not. With no tokens at all the averages are None.
    """
    tokens = [m for sequence in results for m in sequence]
    n = len(tokens)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    finite_margins = [m.margin for m in tokens if math.isfinite(m.margin)]
    return {
        "total_tokens": n,
        "exact_match_rate": mean([float(m.exact_match) for m in tokens]),
        "avg_prob": mean([m.prob for m in tokens]),
        "avg_margin": mean(finite_margins),
        "avg_logit_rank": mean([m.logit_rank for m in tokens]),
        "avg_gumbel_rank": mean([m.gumbel_rank for m in tokens if math.isfinite(m.gumbel_rank)]),
        "infinite_margin_rate": (n - len(finite_margins)) / n if n else None,
    }
