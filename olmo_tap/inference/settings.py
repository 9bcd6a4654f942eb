"""Everything a decoder is told, as one frozen and validated object.

The CLI, the service, the benchmarks, training and the audit build decoders from a ``DecodeSettings``; the
transcript stores ``to_dict()`` (with facts about the run beside it) and the audit reads it back with
``from_dict``, so no setting is copied by string key from one place to another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from olmo_tap.inference.jury import check_beta, check_veto_threshold
from olmo_tap.inference.sampling import check_temperature

Mode = Literal["poe", "naive", "single"]
MODES: tuple[str, ...] = ("poe", "naive", "single")


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode one answer.

    :param mode: "poe" (one head drafts, the others verify as a Product of Experts), "naive" (the text heads'
        logits averaged every step) or "single" (one head).
    :param gamma: draft tokens per round (a pure speed knob: the output does not depend on it).
    :param first_gamma: draft tokens in the first round (default 1: the first token reaches the reader after one
        draft step and one verification, not gamma of them, and before a ``compile``'s one-off compile; None:
        gamma, as transcripts from before this setting were decoded). A speed knob too.
    :param beta: inverse temperature on the verifiers' summed log-probabilities.
    :param temperature: 0 is greedy.
    :param seed: seed of every random draw (None: a fresh one per answer, reported in the output).
    :param veto_threshold: tau in [0, 1): a token any verifier gives probability < tau is never emitted;
        None keeps the original soft PoE.
    :param draft_head: fixed draft head (None: chosen from the seed).
    :param head: the head of mode "single" (default: the draft head).
    :param n_llm_heads: text heads taking part (None: every text head of the model).
    :param max_new_tokens: bound on the response length.
    :param ignore_eos: keep going past end-of-text (fixed-length runs for benchmarks).
    :param compile: modes "single" and "poe": one tower's decode step compiled to native code (single: the
        head's; poe: the draft head's, while verification stays eager); faster steps, rounding of the compiler's.
    :param top_logprobs: None: none computed; 0 to 20: each token's log-probability and that many alternatives.
    """

    mode: Mode = "poe"
    gamma: int = 4
    first_gamma: int | None = 1
    beta: float = 1.0
    temperature: float = 0.98
    seed: int | None = None
    veto_threshold: float | None = None
    draft_head: int | None = None
    head: int | None = None
    n_llm_heads: int | None = None
    max_new_tokens: int = 200
    ignore_eos: bool = False
    compile: bool = False
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not _is_int_at_least(self.gamma, 1):
            raise ValueError(f"gamma must be an integer >= 1, got {self.gamma!r}")
        if self.first_gamma is not None and not _is_int_at_least(self.first_gamma, 1):
            raise ValueError(f"first_gamma must be None or an integer >= 1, got {self.first_gamma!r}")
        object.__setattr__(self, "beta", check_beta(self.beta))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        object.__setattr__(self, "veto_threshold", check_veto_threshold(self.veto_threshold))
        if not _is_int_at_least(self.max_new_tokens, 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for name in ("seed", "draft_head", "head", "n_llm_heads"):
            value = getattr(self, name)
            if value is not None and not _is_int_at_least(value, 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        if self.compile and self.mode == "naive":
            raise ValueError("compile applies to modes 'single' and 'poe' (one head per step), not 'naive'")
        top = self.top_logprobs
        if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
            raise ValueError(f"top_logprobs must be None or an integer in [0, 20], got {top!r}")

    def replace(self, **changes: Any) -> DecodeSettings:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodeSettings:
        """Read the fields this class knows from ``data`` (a transcript's settings hold more: facts of the run)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _is_int_at_least(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def round_gamma(gamma: int, first_gamma: int | None, round_index: int) -> int:
    """Draft tokens in round ``round_index`` (from 0) of PoE decoding: ``first_gamma`` in the first round (None:
    gamma), gamma after. The decoder and the audit's count of rounds both read it."""
    return first_gamma if round_index == 0 and first_gamma is not None else gamma


# What a transcript's settings hold besides the DecodeSettings fields: facts of the run an audit needs.
RUN_FACTS: tuple[str, ...] = (
    "vocab_limit",  # tokens the answer could use (the tokenizer's, within the model's vocabulary)
    "stop_ids",  # ids that end an answer ([] with ignore_eos)
    "n_heads",  # the Hydra's split, so an audit can rebuild the same jury from the base checkpoint
    "heads_depth",
    "dtype",
    "quantization",  # the quantized weights' scheme (int8, int4, gguf), absent for float weights
    "quant_kernel",  # ... and their products' route (native, fused, dequantize): they differ in rounding
    "linear",  # float weights' products' route on CPU (native, onednn, stock): they differ in rounding
    "device",
    "threads",  # products of a few rows sum in another order with another thread count
    "batched",  # decoded in a batch with other answers
    "batch_invariant",  # ... on kernels that give each row the same bits whatever the batch
    "attention",  # the cached attention's route (native or torch): they agree within rounding, not bit for bit
    "norm",  # the norms' route (native or torch): the same
    "mcq",  # multiple choice: the question the uncertainty head scores, so an audit can re-score it
    "question",
)
RECORDED_SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DecodeSettings)) + RUN_FACTS
