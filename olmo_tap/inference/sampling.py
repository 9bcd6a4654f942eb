"""Sampling as a few pure functions, with randomness that can be replayed.

Every random number is drawn from a generator seeded by (seed, absolute
position, purpose). A token's noise therefore depends only on where it sits in
the sequence, not on how many draws came before it: decoding is replayable in
one teacher-forced pass, speculative decoding's output does not depend on its
step size, and a response generated on a GPU verifies on a laptop (the noise is
always drawn on the CPU in fp32, then moved).

Sampling itself is Gumbel-max: ``argmax(logits / T + G)`` with standard Gumbel
noise ``G`` is an exact draw from ``softmax(logits / T)``.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

import numpy as np
import torch


class Purpose(StrEnum):
    """Independent random streams used at one position."""

    SAMPLE = "sample"  # the emitted token of a plain decoder, or the PoE draft
    ACCEPT = "accept"  # the uniform of the speculative acceptance test
    RESAMPLE = "resample"  # the corrected-distribution draw after a rejection
    DRAFT_HEAD = "draft-head"  # which head drafts, drawn once per generation (position -1)
    CERTAINTY_SAMPLE = "certainty-sample"  # the seed of the i-th answer sampled for KLE (position i)


def stream_seed(seed: int, position: int, purpose: Purpose | str) -> int:
    """A 63-bit generator seed for one (seed, position, purpose); stable across runs and machines."""
    key = f"olmo-tap/{int(seed)}/{int(position)}/{Purpose(purpose).value}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def head_for_seed(seed: int, n_heads: int) -> int:
    """The draft head (or the single-head decoder's head) of a generation, derived from its seed so that a
    transcript or a verifier can tell which head it was without being told."""
    return stream_seed(seed, -1, Purpose.DRAFT_HEAD) % n_heads


def uniform(seed: int, position: int, purpose: Purpose | str, size: int = 1) -> torch.Tensor:
    """``size`` uniforms in [0, 1) (fp32, CPU) for one (seed, position, purpose)."""
    generator = torch.Generator(device="cpu").manual_seed(stream_seed(seed, position, purpose))
    return torch.rand(size, generator=generator, dtype=torch.float32)


def gumbel(seed: int, position: int, purpose: Purpose | str, size: int) -> torch.Tensor:
    """Standard Gumbel noise (fp32, CPU): -log(-log U), with U kept away from 0 and 1."""
    u = uniform(seed, position, purpose, size).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and the top-p nucleus; top_k <= 0 and top_p == 1 are off."""
    if top_p <= 0 or top_p > 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep a token if the mass before it is below top_p (so the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# A sampling temperature is 0 (greedy) or within these bounds. Below the lowest, logits / T leave float32's range
# (1e-300 is 0 in float32: every score became NaN and every token id 0, silently); the distribution there is
# argmax's to within float32 anyway. Above the highest, a 30-nat spread of logits is flattened under 0.3 nats:
# noise, not a choice of words.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0


def check_temperature(temperature: float | None) -> float:
    """None or 0 mean greedy (returned as 0.0); else a number in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if temperature is None:
        return 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    temperature = float(temperature)
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {temperature}"
        )
    return temperature


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)``, the same indices (the first maximum; a NaN counts as the largest value), read
    by numpy's vectorised loop where ``x`` is an fp32 CPU tensor: ATen's takes ~100 us over a 49k vocabulary on
    this project's 2-core Xeon, numpy's ~5 us, and a PoE round of 8 answers reads ~190 such rows (drafts, votes,
    decisions)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.ndim > 0:
        return torch.from_numpy(np.asarray(x.detach().numpy().argmax(axis=-1)))
    return torch.argmax(x, dim=-1)


def logit_scores(
    logits: torch.Tensor, temperature: float, seed: int, position: int, purpose: Purpose | str = Purpose.SAMPLE
) -> torch.Tensor:
    """The scores whose argmax is the sampled token: ``logits`` at temperature 0, else ``logits / T + G``.
    An audit reads how far another token was from winning (in nats) off the same scores."""
    if temperature == 0:
        return logits
    noise = gumbel(seed, position, purpose, logits.size(-1)).to(logits.device)
    return logits.float() / temperature + noise


def prob_scores(probs: torch.Tensor, seed: int, position: int, purpose: Purpose | str) -> torch.Tensor:
    """Gumbel-max scores of a probability vector: ``log p + G`` (zeros score -inf and never win)."""
    noise = gumbel(seed, position, purpose, probs.size(-1)).to(probs.device)
    return torch.log(probs.float()) + noise


class NonFiniteLogitsError(ValueError):
    """A model gave NaN or infinite logits where a distribution was needed (decoding, a replay, a verification)."""


NON_FINITE_CAUSE = "corrupt weights, or a dtype too narrow for this model (float16 overflows; use float32 or bfloat16)"


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float,
    seed: int,
    position: int,
    purpose: Purpose | str = Purpose.SAMPLE,
) -> int:
    """One token from 1-D ``logits`` (already filtered): greedy at temperature 0, else Gumbel-max."""
    return int(argmax_last(logit_scores(logits, temperature, seed, position, purpose)))


def sample_from_probs(probs: torch.Tensor, seed: int, position: int, purpose: Purpose | str) -> int:
    """One token from a 1-D probability vector by Gumbel-max on its logarithm (zeros never win)."""
    return int(argmax_last(prob_scores(probs, seed, position, purpose)))
