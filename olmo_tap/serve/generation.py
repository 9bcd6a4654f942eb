"""One chat answer as a job for the worker thread: the checked request, and the PoE run that honours it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from olmo_tap.inference.poe import PoE, PoEOutput
from olmo_tap.serve.engine import Job
from olmo_tap.serve.responses import logprobs_entry
from olmo_tap.serve.trust import token_trust


@dataclass(frozen=True)
class GenerationPlan:
    """A request after validation: everything the decoder needs, nothing left to check."""

    messages: list[dict[str, str]]
    prompt_tokens: int
    max_new_tokens: int
    temperature: float
    seed: int | None
    mode: str
    gamma: int
    beta: float
    veto_threshold: float | None
    draft_head: int | None
    mcq: bool
    stream: bool
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Generated:
    """The answer, and OpenAI's ``logprobs.content`` of its tokens when they were asked for (not streamed:
    a stream carries each token's entry in its chunk)."""

    output: PoEOutput
    logprobs: list[dict[str, Any]] | None = None


def run_generation(job: Job, model: Any, tokenizer: Any, plan: GenerationPlan) -> Generated:
    """Decode on the worker thread, posting each token (``{"trust": ..., "logprobs": ...}``) when streaming.

    Between tokens, a client that left or a passed deadline stops the decoding: the answer so far is
    returned with ``job.stopped`` set, and ``finish_reason`` "time_limit" when the deadline stopped it.
    """
    decoder = PoE(
        model,
        tokenizer,
        gamma=plan.gamma,
        beta=plan.beta,
        max_new_tokens=plan.max_new_tokens,
        seed=plan.seed,
        veto_threshold=plan.veto_threshold,
        draft_head=plan.draft_head,
        mode=plan.mode,  # type: ignore[arg-type]
        head=plan.draft_head,
        top_logprobs=plan.top_logprobs if plan.logprobs else None,
    )
    # Token texts for logprobs are decoded here, on the worker thread, which alone uses this tokenizer.
    logprobs: list[dict[str, Any]] | None = [] if plan.logprobs and not plan.stream else None
    started = time.perf_counter()
    stream = decoder.stream(messages=plan.messages, is_mcq=plan.mcq, temperature=plan.temperature)
    events = iter(stream)
    try:
        # Check before asking for each next token, so an answer that is already complete is never cut short.
        while not (stopped := job.stop_reason()):
            event = next(events, None)
            if event is None:
                break
            entry = logprobs_entry(tokenizer, event) if plan.logprobs else None
            if plan.stream:
                job.post("token", {"trust": token_trust(event), "logprobs": entry})
            elif logprobs is not None:
                logprobs.append(entry)
        job.stopped = stopped
    finally:
        events.close()  # an abandoned decoding leaves its generator (and torch.no_grad) on this thread
    output = stream.output
    if job.stopped:
        output.elapsed_s = time.perf_counter() - started
        if job.stopped == "time_limit":
            output.finish_reason = "time_limit"
    return Generated(output, logprobs)
