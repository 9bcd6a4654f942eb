"""One chat answer as a job for the worker's batch: the checked request, and the decoding that honours it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from olmo_tap.certainty.method import CertaintyPlan
from olmo_tap.engine.batch import BatchRunner, Op
from olmo_tap.inference.poe import PoE, PoEOutput, Sequence, TokenEvent
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.serve.engine import Job
from olmo_tap.serve.responses import logprobs_entry
from olmo_tap.serve.trust import token_trust


@dataclass(frozen=True)
class GenerationPlan:
    """A request after validation: everything the decoder needs, nothing left to check."""

    messages: list[dict[str, str]]
    prompt_tokens: int
    settings: DecodeSettings
    certainty: CertaintyPlan
    stream: bool = False
    logprobs: bool = False
    # The robustness probe's attacked answers, when it was asked for (empty: no bank to attack with)
    attacks: tuple[GenerationPlan, ...] | None = None

    @property
    def mcq(self) -> bool:
        """The uncertainty head scores this answer (its certainty is p(correct))."""
        return self.certainty.mcq


@dataclass
class Generated:
    """The answer, and OpenAI's ``logprobs.content`` of its tokens when they were asked for (not streamed:
    a stream carries each token's entry in its chunk)."""

    output: PoEOutput
    logprobs: list[dict[str, Any]] | None = None


class GenerationWork:
    """One chat answer decoded in the worker's batch (``olmo_tap.serve.engine.DecodeWork``): posts each token
    (``{"trust": ..., "logprobs": ...}``) when streaming. A client that left or a passed deadline stops it
    before its next step: the answer so far is the result, with ``finish_reason`` "time_limit" when the deadline
    stopped it."""

    def __init__(self, model: Any, tokenizer: Any, plan: GenerationPlan) -> None:
        self.decoder = PoE.from_settings(model, tokenizer, plan.settings)
        self.tokenizer = tokenizer
        self.plan = plan
        # Token texts for logprobs are decoded on the worker thread, which alone uses this tokenizer.
        self.logprobs: list[dict[str, Any]] | None = [] if plan.logprobs and not plan.stream else None
        self.sequence: Sequence | None = None

    def begin(self, job: Job, runner: BatchRunner, slot: int) -> Op | None:
        plan = self.plan
        self.sequence = self.decoder.start(
            messages=plan.messages, is_mcq=plan.mcq, cache=runner.cache, slot=slot, batched=runner.batched
        )
        return self.advance(job, None)

    def advance(self, job: Job, result: Any) -> Op | None:
        assert self.sequence is not None
        events, op = self.sequence.advance(result)
        for event in events:
            self.sequence.deliver(event)
            if not isinstance(event, TokenEvent):
                continue
            entry = logprobs_entry(self.tokenizer, event) if self.plan.logprobs else None
            if self.plan.stream:
                job.post("token", {"trust": token_trust(event), "logprobs": entry})
            elif self.logprobs is not None:
                self.logprobs.append(entry)
        return op

    def finish(self, job: Job) -> Generated:
        assert self.sequence is not None
        sequence = self.sequence
        if job.stopped:
            sequence.stop()
            if job.stopped == "time_limit":
                sequence.output.finish_reason = "time_limit"
        else:
            sequence.finish()
        return Generated(sequence.output, self.logprobs)


class SideAnswers:
    """Answers decoded in the worker's batch beside a request's answer (KLE's samples, the robustness probe's
    attacked answers): queued at once, so they decode alongside it, and cancelled with the request. A queue with no
    room for them (or a server shutting down) leaves ``failure`` saying so and nothing queued: the signal they
    serve then has no value, with that reason, and the answer goes on."""

    def __init__(self, service: Any, request_id: str, tag: str, plans: list[GenerationPlan]) -> None:
        self.service = service
        self.jobs: list[Job] = []
        self.failure: str | None = None
        try:
            for plan in plans:
                work = GenerationWork(service.model, service.tokenizer, plan)
                self.jobs.append(service.submit_decode(f"{request_id}-{tag}{len(self.jobs)}", work))
        except Exception as e:  # the queue is full or the server is stopping
            self.failure = f"could not be queued ({getattr(e, 'message', e)})"
            self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            self.service.engine.cancel(job)

    async def outputs(self) -> list[PoEOutput]:
        """Their answers, once every one is decoded (a failed one raises its APIError)."""
        return [(await self.service.result(job, None)).output for job in self.jobs]
