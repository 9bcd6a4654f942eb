"""The jury's decision at one position, as pure functions on logits.

- ``jury_distribution``: the Product of Experts P of the verifier heads, with the
  optional hard veto;
- ``speculative_decision``: accept a draft or resample, exactly distributed as P
  (speculative sampling theorem), or greedily (accept iff the draft is argmax P).

All randomness comes from ``olmo_tap.inference.sampling`` streams keyed by
(seed, absolute position, purpose), so a decision depends on nothing but the
position's logits and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_tap.inference.sampling import Purpose, argmax_last, sample_from_probs, uniform

# Below this residual mass the corrected distribution max(0, P - q) is numerically empty
# (the draft distribution already equals P); we then sample from P itself.
RESIDUAL_EPS = 1e-12


def check_veto_threshold(tau: float | None) -> float | None:
    if tau is None:
        return None
    tau = float(tau)
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"veto_threshold must be in [0, 1) or None, got {tau}")
    return tau


# beta scales the verifiers' summed logits (over T): bounded so that with T >= MIN_TEMPERATURE the product stays
# far inside float32 (an infinite beta made every score inf or NaN and every decision a resample of token 0).
MAX_BETA = 100.0


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= MAX_BETA:
        raise ValueError(f"beta must be a number in (0, {MAX_BETA:g}], got {beta!r}")
    return float(beta)


def veto_mask(verifier_logits: torch.Tensor, veto_threshold: float) -> torch.Tensor:
    """(positions, vocab) bool: tokens every verifier gives probability >= tau under its own untempered softmax."""
    return (torch.softmax(verifier_logits.float(), dim=-1) >= veto_threshold).all(dim=0)


def jury_log_target(verifier_logits: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """(positions, vocab): log P up to a per-position constant, ``beta * sum_i logits_i / T`` (T = 1 if greedy).

    sum_i log softmax(l_i / T) = sum_i l_i / T - sum_i logsumexp(l_i / T); the second term is constant over
    the vocabulary and cancels when normalised, so one sum over heads suffices."""
    scale = temperature if temperature > 0 else 1.0
    return verifier_logits.float().sum(dim=0) * (beta / scale)


def jury_distribution(
    verifier_logits: torch.Tensor, temperature: float, beta: float, veto_threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """P and the allowed set for each position.

    verifier_logits: (n_verifiers, positions, vocab). P is proportional to
    ``exp(beta * sum_i log softmax(logits_i / T))`` (T = 1 when greedy). With a veto
    threshold tau, tokens to which any verifier gives probability < tau (its own
    untempered softmax) are removed and P is renormalised on what is left, in log
    space, so even a tiny remaining mass is renormalised exactly.

    Returns (P (positions, vocab) fp32, allowed (positions,) bool: False where every token
    was vetoed, in which case that row of P is meaningless and the jury must abstain).
    """
    logits = verifier_logits.float()
    log_target = jury_log_target(logits, temperature, beta)
    if veto_threshold is None:
        return torch.softmax(log_target, dim=-1), torch.ones(log_target.size(0), dtype=torch.bool)
    allowed = veto_mask(logits, veto_threshold)
    log_target = log_target.masked_fill(~allowed, float("-inf"))
    any_allowed = allowed.any(dim=-1)
    # Rows with nothing allowed would be NaN; fill them harmlessly, they are never sampled.
    log_target = torch.where(any_allowed.unsqueeze(-1), log_target, torch.zeros_like(log_target))
    return torch.softmax(log_target, dim=-1), any_allowed.cpu()


@dataclass(frozen=True)
class Decision:
    token: int
    accepted: bool


def speculative_decision(
    target: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_token: int,
    temperature: float,
    seed: int,
    position: int,
) -> Decision:
    """Accept ``draft_token`` or emit a replacement; the emitted token is distributed exactly as ``target``.

    Sampled: accept with probability min(1, P(x) / q(x)) using the (seed, position, ACCEPT)
    uniform, where q is the distribution the draft was really drawn from; otherwise draw
    from norm(max(0, P - q)) with the RESAMPLE stream (P itself if that is numerically empty).
    Greedy (temperature 0): accept iff the draft is argmax P, else emit argmax P.
    """
    if temperature == 0:
        best = int(argmax_last(target))
        return Decision(best, best == draft_token)
    assert draft_probs is not None
    p, q = float(target[draft_token]), float(draft_probs[draft_token])
    if float(uniform(seed, position, Purpose.ACCEPT)[0]) * q < p:
        return Decision(draft_token, True)
    residual = (target - draft_probs).clamp_(min=0)
    mass = float(residual.sum())
    if mass > RESIDUAL_EPS and mass == mass:
        return Decision(sample_from_probs(residual / mass, seed, position, Purpose.RESAMPLE), False)
    return Decision(sample_from_probs(target, seed, position, Purpose.RESAMPLE), False)
