"""An answer's certainty in the service: the KLE samples decoded in the worker's batch beside the answer, then
the similarity, the value and the claim ledger as one job on the worker (the jury's similarities use the model).

A certainty that fails (the queue has no room for the samples, their time ran out) leaves the answer as it is:
its certainty says why it has no value, it never fails the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from olmo_tap.certainty.method import ABSTAINED, CertaintyPlan
from olmo_tap.certainty.sampled import kle_with_claims, sample_seeds, sample_settings
from olmo_tap.inference.poe import PoEOutput
from olmo_tap.serve.generation import GenerationPlan, SideAnswers

log = logging.getLogger("olmo_tap.serve")


class AnswerCertainty:
    """The certainty of one answer being decoded: starts its samples (for KLE) when created, and gives the
    certainty object once the answer is done (``result``)."""

    def __init__(self, service: Any, request_id: str, plan: GenerationPlan) -> None:
        self.service, self.request_id, self.plan = service, request_id, plan
        self.samples: SideAnswers | None = None
        certainty: CertaintyPlan = plan.certainty
        if not certainty.kle:
            return
        settings = sample_settings(plan.settings)
        assert plan.settings.seed is not None  # the service fixes the seed before decoding when KLE is asked for
        samples = [
            GenerationPlan(plan.messages, plan.prompt_tokens, settings.replace(seed=seed), certainty)
            for seed in sample_seeds(plan.settings.seed)
        ]
        self.samples = SideAnswers(service, request_id, "kle", samples)

    def cancel(self) -> None:
        if self.samples is not None:
            self.samples.cancel()

    async def result(self, output: PoEOutput) -> dict[str, Any]:
        certainty: CertaintyPlan = self.plan.certainty
        if certainty.mcq:
            return certainty.from_head(output.uncertainty)
        if not certainty.kle or self.samples is None:
            return certainty.unavailable()
        failure = self.samples.failure and f"its samples {self.samples.failure}"
        if failure is None and output.abstained:
            failure = ABSTAINED
        if failure is not None:
            self.cancel()
            return certainty.failed(failure)
        try:
            samples = await self.samples.outputs()
            question = self.plan.messages[-1]["content"]
            similarity = self.service.similarity
            job = self.service.submit(
                f"{self.request_id}-kle", lambda job: kle_with_claims(output.text, samples, similarity, question)
            )
            return certainty.from_kle(await self.service.result(job, None))
        except Exception as e:
            log.warning("%s: KLE certainty failed: %s", self.request_id, e)
            self.cancel()
            return certainty.failed(f"KLE failed ({getattr(e, 'message', e)})")
