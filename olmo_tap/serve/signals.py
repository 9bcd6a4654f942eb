"""What is measured beside one answer being decoded: its certainty (KLE's samples) and its robustness (the attacked
answers). Both start when the answer is queued, so their answers decode in the batch beside it, and both are
cancelled with its request."""

from __future__ import annotations

import asyncio
from typing import Any

from olmo_tap.inference.poe import PoEOutput
from olmo_tap.serve.certainty import AnswerCertainty
from olmo_tap.serve.generation import GenerationPlan
from olmo_tap.serve.robustness import AnswerRobustness


class AnswerSignals:
    def __init__(self, service: Any, request_id: str, plan: GenerationPlan) -> None:
        self.certainty = AnswerCertainty(service, request_id, plan)
        self.robustness = AnswerRobustness(service, request_id, plan)

    def cancel(self) -> None:
        self.certainty.cancel()
        self.robustness.cancel()

    async def results(self, output: PoEOutput) -> tuple[dict[str, Any], dict[str, Any]]:
        """(certainty, robustness) of the finished ``output``, each waiting for its own answers."""
        certainty, robustness = await asyncio.gather(self.certainty.result(output), self.robustness.result(output))
        return certainty, robustness
