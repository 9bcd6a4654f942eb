"""An answer's robustness in the service: the attacked answers (``olmo_tap.robustness.probe``) decoded in the
worker's batch beside the answer, then the flips and the record as one job on the worker (the jury's
similarities use the model).

Like the certainty, a probe that fails (no room in the queue, an attacked prompt too long for the context, the
time limit) leaves the answer as it is: its robustness says why it has no value, it never fails the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from olmo_tap.inference.poe import PoEOutput
from olmo_tap.robustness.probe import (
    ABSTAINED,
    EMPTY_BANK,
    NO_BANK,
    NOT_REQUESTED,
    attack_suffixes,
    is_mcq,
    question_of,
    robustness_record,
    unavailable,
)
from olmo_tap.serve.generation import GenerationPlan, SideAnswers

log = logging.getLogger("olmo_tap.serve")


class AnswerRobustness:
    """The robustness of one answer being decoded: starts its attacked answers (when asked for) when created, and
    gives the robustness object once the answer is done (``result``)."""

    def __init__(self, service: Any, request_id: str, plan: GenerationPlan) -> None:
        self.service, self.request_id, self.plan = service, request_id, plan
        self.attacks: SideAnswers | None = None
        self.refused: str | None = None  # why the attacked answers were not even queued
        if not plan.attacks:
            return
        longest, budget = max(a.prompt_tokens for a in plan.attacks), plan.settings.max_new_tokens
        if longest + budget > service.context:  # a suffix lengthens the prompt: the answer's budget may not fit
            self.refused = (
                f"the attacked prompts (up to {longest} tokens) + the answer's {budget} new tokens exceed the "
                f"model's context of {service.context} tokens"
            )
            return
        self.attacks = SideAnswers(service, request_id, "adv", list(plan.attacks))

    def cancel(self) -> None:
        if self.attacks is not None:
            self.attacks.cancel()

    async def result(self, output: PoEOutput) -> dict[str, Any]:
        plan, service = self.plan, self.service
        if plan.attacks is None:
            return unavailable(NOT_REQUESTED)
        if self.refused is not None:
            return unavailable(self.refused)
        if self.attacks is None:
            return unavailable(NO_BANK if service.attack_bank is None else EMPTY_BANK)
        failure = self.attacks.failure and f"its attacked answers {self.attacks.failure}"
        if failure is None and output.abstained:
            failure = ABSTAINED
        if failure is not None:
            self.cancel()
            return unavailable(failure)
        try:
            attacks = await self.attacks.outputs()
            suffixes = attack_suffixes(service.attack_bank)
            mcq = is_mcq(question_of(plan.messages), plan.mcq)
            job = service.submit(
                f"{self.request_id}-robustness",
                lambda job: robustness_record(
                    output, attacks, suffixes, plan.messages, mcq, service.similarity, service.bank_info
                ),
            )
            return await service.result(job, None)
        except Exception as e:
            log.warning("%s: the robustness probe failed: %s", self.request_id, e)
            self.cancel()
            return unavailable(f"the robustness probe failed ({getattr(e, 'message', e)})")
