"""Flips measured by decoding: which option letter a decoder gives with and without a suffix.

The decoders are greedy and named as targets are: ``jury`` (PoE over every text head), ``jury+veto`` (the same with
the veto), ``naive`` (the heads' averaged distribution) and ``head:<i>`` (one head alone). A flip is a different
option letter (``parse_choice``; an answer with no letter counts as an answer of its own, so "B" -> no letter is a
flip and no letter -> no letter is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.robustness.settings import parse_target
from olmo_tap.train.mcq import parse_choice

ANSWER_TOKENS = 4  # the letter comes first; a few tokens let "(B)" or "B)" parse too
VETO = 1e-3  # the jury's veto threshold in ``jury+veto`` (the signals experiment's)


def target_settings(target: str) -> DecodeSettings:
    """The greedy decoder a target names: ``jury``, ``jury+veto``, ``naive`` or ``head:<i>``."""
    common: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": ANSWER_TOKENS, "seed": 0}
    if target == "jury+veto":
        return DecodeSettings(mode="poe", veto_threshold=VETO, **common)
    if target == "naive":
        return DecodeSettings(mode="naive", **common)
    head = parse_target(target)
    if head is None:
        return DecodeSettings(mode="poe", **common)
    return DecodeSettings(mode="single", head=head, **common)


def answer_letters(
    model: HydraTransformer, tokenizer: Any, settings: DecodeSettings, texts: Sequence[str], batch: int = 16
) -> list[str | None]:
    """The option letter the decoder gives to each user message (None: none it could parse)."""
    decoder = PoE.from_settings(model, tokenizer, settings)
    outputs = decoder.generate_many(list(texts), max_batch=batch, seeds=[0] * len(texts))
    return [parse_choice(o.text) for o in outputs]


def flips(clean: Sequence[str | None], attacked: Sequence[str | None]) -> int:
    return sum(a != c for a, c in zip(attacked, clean, strict=True))
