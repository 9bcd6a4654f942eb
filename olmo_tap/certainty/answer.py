"""An answer's certainty outside the service (the CLI, batch jobs): the plan for a message, then its value once
the answer is decoded; for KLE, its samples decoded in one batch after the answer."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from olmo_tap.certainty.method import ABSTAINED, CertaintyPlan, plan_certainty
from olmo_tap.certainty.sampled import kle_with_claims, sample_answers
from olmo_tap.certainty.similarity import make_similarity
from olmo_tap.inference.poe import PoEOutput
from olmo_tap.inference.settings import DecodeSettings


class CertaintyRun:
    """Certainty ``requested`` (``olmo_tap.certainty.method.CHOICES``) for answers decoded with ``settings``;
    ``similarity``: KLE's, by name (an NLI checkpoint loads now: a missing one should cost a second, not an
    answer); ``seed``: the answers' fixed seed, if any; ``on_sampling``: told before KLE samples (progress)."""

    def __init__(
        self,
        requested: str,
        model: Any,
        tokenizer: Any,
        settings: DecodeSettings,
        similarity: str,
        seed: int | None = None,
        on_sampling: Callable[[], None] | None = None,
    ) -> None:
        self.requested, self.fixed_seed = requested, seed
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.similarity = make_similarity(similarity, model, tokenizer)
        self.on_sampling = on_sampling

    def plan(self, messages: list[dict[str, str]], seed: int | None = None) -> tuple[CertaintyPlan, int | None]:
        """The certainty plan of the last message, and the answer's seed (``seed``, the fixed one, or one drawn
        now when KLE derives its samples' seeds from it)."""
        plan = plan_certainty(self.requested, messages[-1]["content"], self.model.uncertainty_head is not None)
        seed = self.fixed_seed if seed is None else seed
        if seed is None and plan.kle:
            seed = int.from_bytes(os.urandom(4), "little")
        return plan, seed

    def result(self, plan: CertaintyPlan, output: PoEOutput, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The certainty object of ``output`` (the answer to ``messages``)."""
        if plan.mcq:
            return plan.from_head(output.uncertainty)
        if not plan.kle:
            return plan.unavailable()
        if output.abstained:
            return plan.failed(ABSTAINED)
        if self.on_sampling is not None:
            self.on_sampling()
        samples = sample_answers(self.model, self.tokenizer, self.settings, messages, output.settings["seed"])
        return plan.from_kle(kle_with_claims(output.text, samples, self.similarity, messages[-1]["content"]))
