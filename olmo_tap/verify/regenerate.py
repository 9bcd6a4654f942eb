"""Re-run the generator itself on a transcript's claim: the exact replay of last resort.

The audit's block replay computes every position's logits in blocks of >= 16 rows; the generator computed them
in its own shapes (a prompt prefill, one-row draft steps, verification passes of gamma + 1 rows). On a CPU
those shapes round differently (matrix products of different row counts, and of different thread counts, sum in
different orders), so at a decision that is a tie to ~1e-5 nats the two exact computations of the same jury may
pick different tokens. When the block replay disagrees with a claim in the generator's own dtype and device
class, the audit runs the decoder once more with the transcript's settings, seed and thread count and compares
every token, draft and decision: a claim the generator's own arithmetic reproduces is honest, and the
disagreement was a rounding tie, not a forgery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.poe import PoE, TokenEvent
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.model import native_attention, native_linear, native_norm
from olmo_tap.model.kernels import torch_threads
from olmo_tap.quant import linear as qlinear


@dataclass
class Regeneration:
    reproduced: bool
    diverged_at: int | None  # first emitted index where the generator decides otherwise (None: nowhere)
    detail: str
    events: list[TokenEvent] = field(default_factory=list, repr=False)  # the generator's, up to the divergence

    def to_dict(self) -> dict[str, Any]:
        return {"reproduced": self.reproduced, "diverged_at": self.diverged_at, "detail": self.detail}


@contextmanager
def generator_routes(settings: dict[str, Any]) -> Iterator[None]:
    """Within the block, the kernels take the routes the transcript's generator took: its cached attention's (a
    transcript from before the native route was decoded on torch's), its float products' (oneDNN before they
    were recorded) and its quantized products' (where recorded;
    their routes round activations differently, which no tolerance of the block replay should have to absorb)."""
    with ExitStack() as stack:
        stack.enter_context(native_attention.route_as(settings.get("attention") or "torch"))
        # a transcript from before the norms' route was recorded was decoded on torch's
        stack.enter_context(native_norm.route_as(settings.get("norm") or "torch"))
        if settings.get("quantization") is None and settings.get("linear") in (*native_linear.TAKEN, None):
            # a float transcript from before the native products was decoded on oneDNN's
            stack.enter_context(native_linear.route_as(settings.get("linear") or "onednn"))
        if settings.get("quant_kernel") is not None:
            stack.enter_context(qlinear.route_as(qlinear.replay_route(settings["quant_kernel"])))
        yield


def decoder_for(hydra: HydraTransformer, tokenizer: Any, settings: dict[str, Any]) -> PoE:
    """The decoder a transcript's settings describe (read as ``DecodeSettings``; a version 1 transcript has
    no ``head`` nor ``ignore_eos``: its ``draft_head`` and ``stop_ids`` say them)."""
    mode = settings["mode"]
    decode = DecodeSettings.from_dict(settings).replace(
        gamma=settings.get("gamma") or 4,
        first_gamma=settings.get("first_gamma"),  # absent from transcripts before it: every round gamma
        max_new_tokens=settings.get("max_new_tokens") or hydra.base_config.max_seq_len,
        draft_head=settings["draft_head"] if mode == "poe" else None,
        head=settings["draft_head"] if mode == "single" else None,
        ignore_eos=settings.get("stop_ids") == [],
        compile=False,
        top_logprobs=None,
    )
    return PoE.from_settings(hydra, tokenizer, decode)


def regenerate(
    hydra: HydraTransformer,
    tokenizer: Any,
    settings: dict[str, Any],
    prompt_ids: list[int],
    claims: list[tuple[int, int, bool]],
    finish_reason: str,
    check_stop: Callable[[], None] | None = None,
) -> Regeneration:
    """Decode the claim's prompt with its settings and compare each (token, draft, resampled) with ``claims``;
    stops at the first divergence. ``finish_reason`` "time_limit": the claim may end before the decoder does."""
    if settings.get("compile"):
        return Regeneration(False, None, "compiled steps are not regenerated (their rounding is the compiler's)")
    decoder = decoder_for(hydra, tokenizer, settings)
    events: list[TokenEvent] = []

    def result(reproduced: bool, detail: str) -> Regeneration:
        return Regeneration(reproduced, None if reproduced else len(events), detail, events)

    with torch_threads(settings.get("threads")), generator_routes(settings):
        stream = decoder.stream(
            prompt_ids=prompt_ids,
            temperature=settings["temperature"],
            seed=settings["seed"],
            batched=bool(settings.get("batched")),  # a batch's arithmetic, as a batch of one
        )
        for event in stream:
            if check_stop is not None:
                check_stop()
            n = len(events)
            if n == len(claims):
                return result(False, f"the generator goes on past the claim's {n} tokens")
            token, draft, resampled = claims[n]
            if event.token_id != token or event.resampled != resampled or (resampled and event.draft_token_id != draft):
                got = f"token {event.token_id}"
                if event.resampled:
                    got += f" (draft {event.draft_token_id} rejected)"
                return result(False, f"the generator emits {got} at token {n}")
            events.append(event)
            if len(events) == len(claims) and finish_reason == "time_limit":
                return result(True, f"the generator reproduces all {len(events)} tokens before the cut")
    if len(events) < len(claims):
        return result(False, f"the generator ends after {len(events)} of the claim's {len(claims)} tokens")
    if stream.output.finish_reason != finish_reason:
        return result(False, f"the generator ends with {stream.output.finish_reason!r}, not {finish_reason!r}")
    return result(True, f"the generator's own arithmetic reproduces all {len(events)} tokens and the ending")
