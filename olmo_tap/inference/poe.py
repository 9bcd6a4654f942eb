"""PoE speculative verification: the Hydra's heads decode as a jury.

One head drafts up to ``gamma`` tokens; the other text heads (the verifiers)
score them in one batched pass over the trunk states the draft loop saved; the
jury's Product of Experts decides each position in turn (accept, or resample
from the corrected distribution, see ``olmo_tap.inference.jury``).

KV-cache bookkeeping. Invariant between rounds: ``L`` tokens are decided and
every cache (trunk, draft head, verifiers) holds positions ``[0, L - 1)``; the
last decided token is *pending*, not yet run through the model. A round:

- draft: the pending token and then each new draft go through trunk + draft
  head (positions ``L-1 .. L+g-2``), saving the trunk states;
- verify: the verifiers run once on those ``g`` saved states, giving their
  distributions for positions ``L .. L+g-1``;
- decide: on full acceptance every cache holds ``L+g-1`` positions and the last
  draft is pending; on a rejection at ``L+j`` the resampled token is pending and
  the next round writes from position ``L+j`` on: a rollback is an integer, the
  entries past it are stale and overwritten (``olmo_tap.model.kv_cache``).

A rejection therefore costs no extra forward pass: the resampled token is
processed by the next round's first draft step and verification pass. Every
random draw is keyed by (seed, position, purpose), so for a fixed seed and draft
head the output is the same for every ``gamma``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import torch

from olmo_tap.engine.batch import (
    BatchRunner,
    Local,
    Op,
    Prefill,
    Step,
    Verify,
    batch_invariant,
    due,
)
from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.jury import jury_distribution, speculative_decision
from olmo_tap.inference.metrics import entropy_nats, stability_radius, top2_margin, validity_radius
from olmo_tap.inference.prompts import encode_chat, normalise_messages, stop_token_ids, uncertainty_prompt
from olmo_tap.inference.sampling import (
    NON_FINITE_CAUSE,
    NonFiniteLogitsError,
    Purpose,
    argmax_last,
    check_temperature,
    head_for_seed,
    sample_from_logits,
)
from olmo_tap.inference.settings import DecodeSettings, Mode, round_gamma
from olmo_tap.inference.text import TextStream
from olmo_tap.model import native_attention, native_linear, native_norm
from olmo_tap.model.kv_cache import HydraCache
from olmo_tap.quant.linear import recorded_route
from olmo_tap.quant.linear import route_for as quant_route_for
from olmo_tap.weights.tokenizer import vocab_limit

FinishReason = Literal["eos", "length", "abstain"]


@dataclass
class TokenEvent:
    """One decided token and its trust signals, streamed as soon as it is decided."""

    index: int  # 0-based index among the emitted tokens
    position: int  # absolute position in the sequence (prompt included)
    token_id: int
    text: str  # new text this token completes (pieces join to the decoded answer)
    entropy: float  # nats, of the jury's distribution
    stability_radius: int
    stability_margin: float
    resampled: bool = False
    draft_token_id: int | None = None  # the rejected draft when resampled
    draft_text: str | None = None
    validity_radius: int | None = None
    suppression_score: float | None = None  # the jury's probability of the rejected draft
    # Only when the decoder was given ``top_logprobs``: the token's log-probability under the distribution it was
    # decided from (the jury's after the veto; -inf for a vetoed token), and the most likely tokens of that
    # distribution as (token id, log-probability), best first.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    round: int = 0  # the decoding round that decided it (PoE: one draft-and-verify round; else one step)
    drafted: int = 1  # drafts its round put to the jury (PoE); 1 for a plain step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ended:
    """The answer's end, decided in round ``round``: "eos" (an end-of-text token was emitted) or "abstain" (the
    jury allowed no token at the next position)."""

    reason: FinishReason
    round: int


Event = TokenEvent | Ended


@dataclass
class PoEOutput:
    # The original's fields and meanings.
    output_parts: list[str]  # [0] = prompt text; then one entry per emitted token
    original_tokens: list[str]  # rejected draft tokens, parallel to resampled_idxs
    resampled_idxs: list[int]  # indices into output_parts where a draft was rejected
    token_entropies: list[float]  # parallel to output_parts[1:]
    uncertainty: float | None  # p(correct) from the uncertainty head (multiple choice only)
    stability_radii: list[int]  # parallel to output_parts[1:]
    stability_margins: list[float]  # parallel to output_parts[1:]
    validity_radii: list[int]  # parallel to resampled_idxs
    suppression_scores: list[float]  # parallel to resampled_idxs
    # What users need besides.
    token_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    original_token_ids: list[int] = field(default_factory=list)  # parallel to resampled_idxs
    mode: str = "poe"
    draft_head: int | None = None
    verifier_heads: list[int] = field(default_factory=list)
    n_rounds: int = 0
    n_drafted: int = 0  # draft tokens put to the jury
    n_accepted: int = 0
    abstained: bool = False
    finish_reason: str = "length"
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # What the weights deliver: every text head of the model verified (PoE over all of them), and no two of them
    # are identical (a jury of clones is one head). A label never claims more than these.
    whole_jury: bool = False
    independent_heads: bool = False

    @property
    def certified(self) -> bool:
        """The whole jury of independent heads decided every token and ended the answer on its own terms."""
        finished = self.finish_reason in ("eos", "length") and not self.abstained
        return self.mode == "poe" and self.whole_jury and self.independent_heads and finished

    @property
    def verdict(self) -> str:
        """What the answer may be called, in words: never more than ``certified`` says the weights deliver."""
        if self.abstained:
            return "abstained: the jury allowed no token"
        if self.finish_reason == "time_limit":
            return "cut short by the time limit: not certified"
        if self.mode != "poe":
            return f"{self.mode} decoding: not a jury answer"
        if not self.whole_jury:
            return f"PoE over {len(self.verifier_heads) + 1} heads, not the whole jury: not certified"
        if not self.independent_heads:
            return "a jury of identical heads (untrained clones): nothing certified"
        return "certified by the jury"

    @property
    def text(self) -> str:
        return "".join(self.output_parts[1:])

    @property
    def acceptance_rate(self) -> float | None:
        return self.n_accepted / self.n_drafted if self.n_drafted else None

    @property
    def tokens_per_round(self) -> float | None:
        return len(self.token_ids) / self.n_rounds if self.n_rounds else None

    @property
    def tokens_per_second(self) -> float | None:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            certified=self.certified,
            text=self.text,
            acceptance_rate=self.acceptance_rate,
            tokens_per_round=self.tokens_per_round,
            tokens_per_second=self.tokens_per_second,
        )
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoEOutput:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def new_output(
    tokenizer: Any, prompt_ids: list[int], decider: int | None, verifiers: list[int], settings: dict[str, Any]
) -> PoEOutput:
    """An answer with no token yet: the prompt's text, the decider and verifiers, the settings."""
    return PoEOutput(
        output_parts=[tokenizer.decode(prompt_ids, skip_special_tokens=True)],
        original_tokens=[],
        resampled_idxs=[],
        token_entropies=[],
        uncertainty=None,
        stability_radii=[],
        stability_margins=[],
        validity_radii=[],
        suppression_scores=[],
        prompt_ids=list(prompt_ids),
        mode=settings["mode"],
        draft_head=decider,
        verifier_heads=verifiers,
        settings=settings,
    )


class OutputFold:
    """Folds TokenEvents into a PoEOutput: text pieces (incremental detokenisation), signals, rejected drafts.
    The decoder and the audit (which rebuilds every derived field from a replay) share it."""

    def __init__(self, output: PoEOutput, tokenizer: Any) -> None:
        self.output = output
        self.tokenizer = tokenizer
        self.text = TextStream(tokenizer)

    def add(self, event: TokenEvent) -> None:
        event.text = self.text.push(event.token_id)
        if event.resampled and event.draft_token_id is not None:
            event.draft_text = self.tokenizer.decode([event.draft_token_id])
        output = self.output
        output.output_parts.append(event.text)
        output.token_ids.append(event.token_id)
        output.token_entropies.append(event.entropy)
        output.stability_radii.append(event.stability_radius)
        output.stability_margins.append(event.stability_margin)
        if event.resampled:
            output.resampled_idxs.append(len(output.output_parts) - 1)
            output.original_tokens.append(event.draft_text or "")
            output.original_token_ids.append(int(event.draft_token_id or 0))
            output.validity_radii.append(int(event.validity_radius or 0))
            output.suppression_scores.append(float(event.suppression_score or 0.0))

    def close(self) -> None:
        """Text the detokeniser held back until the end (an unfinished character) joins the last piece."""
        tail = self.text.flush()
        if tail and len(self.output.output_parts) > 1:
            self.output.output_parts[-1] += tail


class PoEStream:
    """Iterate to receive TokenEvents as they are decided; ``output`` is complete afterwards. Runs one
    ``Sequence`` on its own cache, each op as it comes."""

    def __init__(self, sequence: Sequence, runner: BatchRunner) -> None:
        self.sequence = sequence
        self.output = sequence.output
        self._runner = runner

    @property
    def witness_hidden(self) -> torch.Tensor | None:
        return self.sequence.witness_hidden

    def __iter__(self) -> Iterator[TokenEvent]:
        sequence = self.sequence
        events, op = sequence.advance()
        while True:
            for event in events:
                sequence.deliver(event)
                if isinstance(event, TokenEvent):
                    yield event
            if op is None:
                break
            events, op = sequence.advance(self._runner.run([op])[0])
        sequence.finish()


class PoE:
    """Decoder for a Hydra: PoE speculative verification, or plain single-head / naive-averaging decoding.

        Built from a ``DecodeSettings`` (``PoE.from_settings``) or from the same fields as keywords. Each answer
        is a ``Sequence``: a generator of model work (``olmo_tap.engine.batch``) and TokenEvents. ``stream`` runs
        one sequence in a cache of its own; ``generate_many`` and the service (``olmo_tap.serve.engine``) run many in
    one shared cache, batched.

        :param model: the Hydra, weights loaded.
        :param tokenizer: its tokenizer (chat template used for prompts).
        :param settings: everything else (see ``DecodeSettings``); keywords build one when it is not given.
    """

    def __init__(
        self,
        model: HydraTransformer,
        tokenizer: Any,
        n_llm_heads: int | None = None,
        gamma: int = 4,
        beta: float = 1.0,
        max_new_tokens: int = 200,
        *,
        first_gamma: int | None = 1,
        seed: int | None = None,
        veto_threshold: float | None = None,
        draft_head: int | None = None,
        mode: Mode = "poe",
        head: int | None = None,
        ignore_eos: bool = False,
        compile: bool = False,
        top_logprobs: int | None = None,
        temperature: float | None = 0.98,
        settings: DecodeSettings | None = None,
    ) -> None:
        if settings is None:
            settings = DecodeSettings(
                mode=mode,
                temperature=temperature,
                gamma=gamma,
                first_gamma=first_gamma,
                beta=beta,
                seed=seed,
                veto_threshold=veto_threshold,
                draft_head=draft_head,
                head=head,
                n_llm_heads=n_llm_heads,
                max_new_tokens=max_new_tokens,
                ignore_eos=ignore_eos,
                compile=compile,
                top_logprobs=top_logprobs,
            )
        n_llm_heads = model.n_text_heads if settings.n_llm_heads is None else settings.n_llm_heads
        if not 1 <= n_llm_heads <= model.n_heads:
            raise ValueError(f"n_llm_heads must be between 1 and the model's {model.n_heads} heads, got {n_llm_heads}")
        if settings.mode == "poe" and n_llm_heads < 2:
            raise ValueError(f"PoE needs at least 2 text heads (one drafts, the rest verify); got {n_llm_heads}")
        for name in ("draft_head", "head"):
            value = getattr(settings, name)
            if value is not None and not value < n_llm_heads:
                raise ValueError(f"{name} {value} out of range for {n_llm_heads} text heads")
        self.settings = settings.replace(n_llm_heads=n_llm_heads)
        self.model = model
        self.tokenizer = tokenizer
        self.n_llm_heads = n_llm_heads
        self.uncertainty_head_idx = n_llm_heads if model.n_heads > n_llm_heads else None
        self.vocab_limit = vocab_limit(tokenizer, model.base_config.vocab_size)
        eos = model.base_config.eos_token_id
        self.stop_ids = frozenset() if settings.ignore_eos else frozenset(stop_token_ids(tokenizer, eos))
        # compared once per weight version (see identical_heads): clones judge nothing apart
        self.independent_heads = not model.identical_heads(range(n_llm_heads))
        self.A_id = tokenizer.encode("A", add_special_tokens=False)[0]
        self.B_id = tokenizer.encode("B", add_special_tokens=False)[0]

    @classmethod
    def from_settings(cls, model: HydraTransformer, tokenizer: Any, settings: DecodeSettings) -> PoE:
        return cls(model, tokenizer, settings=settings)

    # ----- public API -----------------------------------------------------------------------------------------

    def choose_draft_head(self, seed: int) -> int:
        """The draft head: the fixed one, or one derived from the seed (so a transcript can be replayed)."""
        if self.settings.draft_head is not None:
            return self.settings.draft_head
        return head_for_seed(seed, self.n_llm_heads)

    def start(
        self,
        prompt_text: str | None = None,
        is_mcq: bool = False,
        temperature: float | object | None = ...,
        messages: list[dict[str, Any]] | None = None,
        seed: int | None = None,
        prompt_ids: list[int] | None = None,
        *,
        cache: HydraCache | None = None,
        slot: int = 0,
        batched: bool = False,
    ) -> Sequence:
        """Check the request and make its ``Sequence`` (nothing decoded yet). Without ``cache`` it gets a cache
        of its own sized to the prompt plus ``max_new_tokens``; ``batched`` records that it runs in batch
        arithmetic, with or among other sequences (the transcript says so: an audit replays it that way)."""
        temperature = self.settings.temperature if temperature is ... else check_temperature(temperature)  # type: ignore[arg-type]
        if prompt_ids is not None:
            prompt_ids = [int(i) for i in prompt_ids]
            if not prompt_ids or not all(0 <= i < self.vocab_limit for i in prompt_ids):
                raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {self.vocab_limit})")
            conversation = [{"role": "user", "content": self.tokenizer.decode(prompt_ids, skip_special_tokens=True)}]
        else:
            conversation = normalise_messages(prompt_text, messages)
            prompt_ids = encode_chat(self.tokenizer, messages=conversation)
        max_new = self.settings.max_new_tokens
        context = self.model.base_config.max_seq_len
        if len(prompt_ids) + max_new > context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                f"context of {context} tokens"
            )
        if cache is None:
            cache = HydraCache(self.model, 1, len(prompt_ids) + max_new, heads=self.n_llm_heads)
            slot = 0
        elif len(prompt_ids) + max_new > cache.max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds the "
                f"{cache.max_len} positions a sequence may hold here"
            )
        if seed is None:
            seed = self.settings.seed if self.settings.seed is not None else int.from_bytes(os.urandom(4), "little")
        return Sequence(self, prompt_ids, conversation, bool(is_mcq), temperature, seed, cache, slot, batched)

    def stream(
        self,
        prompt_text: str | None = None,
        is_mcq: bool = False,
        temperature: float | object | None = ...,
        messages: list[dict[str, Any]] | None = None,
        seed: int | None = None,
        prompt_ids: list[int] | None = None,
        *,
        batched: bool = False,
    ) -> PoEStream:
        """Start decoding; iterate the result for TokenEvents, then read its ``output``.

        ``prompt_ids`` (already templated token ids) replace the prompt text when given; ``temperature`` and
        ``seed`` default to the settings'. ``batched``: decode in batch arithmetic, as a batch of one, giving
        exactly what the answer gets among others (``generate_many``, the service); an audit replays that way.
        """
        sequence = self.start(prompt_text, is_mcq, temperature, messages, seed, prompt_ids, batched=batched)
        return PoEStream(sequence, BatchRunner(self.model, sequence.cache, batched=batched))

    def generate_with_cache(
        self,
        prompt_text: str | None = None,
        is_mcq: bool = False,
        temperature: float | object | None = ...,
        messages: list[dict[str, Any]] | None = None,
        seed: int | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
        prompt_ids: list[int] | None = None,
    ) -> PoEOutput:
        """Decode a whole response (``messages`` win over ``prompt_text``); temperature None or 0 is greedy."""
        stream = self.stream(
            prompt_text, is_mcq=is_mcq, temperature=temperature, messages=messages, seed=seed, prompt_ids=prompt_ids
        )
        for event in stream:
            if on_token is not None:
                on_token(event)
        return stream.output

    def generate_many(
        self,
        prompts: list[str | list[dict[str, Any]]],
        *,
        max_batch: int = 8,
        seeds: list[int | None] | None = None,
        temperature: float | object | None = ...,
        is_mcq: bool = False,
    ) -> list[PoEOutput]:
        """Decode many prompts (texts, or chat messages) up to ``max_batch`` at a time in batched passes
        (continuous batching: a finished answer's slot goes to the next prompt at once). Each answer is the one
        ``stream`` gives alone for its seed, bit for bit where the kernels are batch-invariant (see
        ``olmo_tap.engine.batch``); its transcript says it was batched."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if self.settings.compile and max_batch > 1 and len(prompts) > 1:
            raise ValueError(
                "compile decodes one sequence at a time (a compiled step's window holds one sequence's keys and "
                "values): use max_batch=1, or decode without compile"
            )
        seeds = [None] * len(prompts) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            return []
        conversations = [
            normalise_messages(p, None) if isinstance(p, str) else normalise_messages(None, p) for p in prompts
        ]
        longest = max(len(encode_chat(self.tokenizer, messages=c)) for c in conversations)
        max_len = min(longest + self.settings.max_new_tokens, self.model.base_config.max_seq_len)
        cache = HydraCache(self.model, min(max_batch, len(prompts)), max_len, heads=self.n_llm_heads)
        runner = BatchRunner(self.model, cache, batched=True)
        waiting = list(range(len(prompts)))[::-1]
        free = list(range(cache.slots))[::-1]
        active: list[tuple[int, Sequence, Op | None]] = []
        outputs: list[PoEOutput | None] = [None] * len(prompts)

        def settle(i: int, sequence: Sequence, events: list[Event], op: Op | None) -> None:
            for event in events:
                sequence.deliver(event)
            if op is not None:
                active.append((i, sequence, op))
                return
            sequence.finish()
            outputs[i] = sequence.output
            cache.release(sequence.slot)
            free.append(sequence.slot)

        while waiting or active:
            while waiting and free:
                i = waiting.pop()
                sequence = self.start(
                    messages=conversations[i], is_mcq=is_mcq, temperature=temperature, seed=seeds[i],
                    cache=cache, slot=free.pop(), batched=True,
                )  # fmt: skip
                settle(i, sequence, *sequence.advance())
            batch, active = active, []
            now = due([op for _, _, op in batch])  # type: ignore[misc]
            results = iter(runner.run([op for (_, _, op), go in zip(batch, now, strict=True) if go]))  # type: ignore[misc]
            for (i, sequence, op), go in zip(batch, now, strict=True):
                if go:
                    settle(i, sequence, *sequence.advance(next(results)))
                else:
                    active.append((i, sequence, op))
        return outputs  # type: ignore[return-value]

    @torch.no_grad()
    def get_uncertainty_score(
        self, prompt_text: str, full_answer_text: str, witness_hidden_state: torch.Tensor
    ) -> float | None:
        """p(correct) of a multiple-choice answer from the uncertainty head: sigmoid(logit A - logit B); None
        when the scoring prompt (question and answer) does not fit the model's context.

        The witness head's hidden state at the last prompt position is injected into the residual
        stream at the last position of the second-pass prompt. Runs uncached.
        """
        if self.uncertainty_head_idx is None:
            raise ValueError("this model has no uncertainty head (it must be the last head, after the text heads)")
        prompt = encode_chat(self.tokenizer, uncertainty_prompt(prompt_text, full_answer_text))
        if len(prompt) > self.model.base_config.max_seq_len:
            return None
        ids = torch.tensor([prompt], device=self.model.device)
        residual = torch.zeros(
            1, ids.size(1), self.model.base_config.d_model, device=ids.device, dtype=self.model.dtype
        )
        residual[0, -1] = witness_hidden_state.reshape(-1).to(residual.dtype)
        logits = self.model(ids, residual=residual, head_indices=[self.uncertainty_head_idx], last_token_only=True)[
            0, 0, 0
        ].float()
        return float(torch.sigmoid(logits[self.A_id] - logits[self.B_id]))


class Sequence:
    """One answer being decoded in ``slot`` of ``cache``: ``advance`` hands it the result of its last op and
    returns the events that result decided and its next op (None once the answer is complete)."""

    def __init__(
        self,
        decoder: PoE,
        prompt_ids: list[int],
        conversation: list[dict[str, Any]],
        is_mcq: bool,
        temperature: float,
        seed: int,
        cache: HydraCache,
        slot: int,
        batched: bool,
    ) -> None:
        self.decoder = decoder
        self.prompt_ids = prompt_ids
        self.conversation = conversation
        self.is_mcq = is_mcq
        self.temperature = temperature
        self.seed = seed
        self.cache = cache
        self.slot = slot
        settings = decoder.settings
        model = decoder.model
        draft = decoder.choose_draft_head(seed)
        single = settings.head if settings.head is not None else draft
        n = decoder.n_llm_heads
        if settings.mode == "poe":
            decider, verifiers = draft, [h for h in range(n) if h != draft]
        elif settings.mode == "naive":
            decider, verifiers = None, list(range(n))
        else:
            decider, verifiers = single, [single]
        self.draft, self.verifiers = draft, verifiers
        record = settings.replace(seed=seed, temperature=temperature, draft_head=decider, head=decider).to_dict()
        record.update(
            vocab_limit=decoder.vocab_limit,
            stop_ids=sorted(decoder.stop_ids),
            # the Hydra's split, so an audit can rebuild the same jury from the base checkpoint
            n_heads=model.n_heads,
            heads_depth=model.config.head_layers,
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            # products of a few rows sum in another order with another thread count: an exact replay needs it
            threads=torch.get_num_threads(),
            # decoded among other sequences: exact alone too where the kernels are batch-invariant
            batched=batched,
            batch_invariant=batch_invariant(model),
            # the attention's route: the two agree within rounding, so an exact replay takes the same one
            attention=native_attention.route_for(model),
            # the norms' route: the same within rounding, so an exact replay takes the same one too
            norm=native_norm.route_for(model),
            # multiple choice: the question the uncertainty head scores, so an audit can re-score it
            mcq=is_mcq,
            question=conversation[-1]["content"] if is_mcq else None,
        )
        if model.quantization_scheme is not None:
            record["quantization"] = model.quantization_scheme
            # the products' route: the native kernel rounds activations to int8, the others do not
            record["quant_kernel"] = recorded_route(quant_route_for(model))
        else:  # the float products' route: each sums in its own order
            record["linear"] = native_linear.route_for(model)
        self.output = new_output(decoder.tokenizer, prompt_ids, decider, verifiers, record)
        self.output.whole_jury = settings.mode == "poe" and n == model.n_text_heads
        self.output.independent_heads = decoder.independent_heads
        self.witness: dict[str, torch.Tensor] = {}
        self.fold = OutputFold(self.output, decoder.tokenizer)
        self.started = time.perf_counter()
        self.done = False
        self._work = self._poe_rounds() if settings.mode == "poe" else self._plain_steps()

    @property
    def witness_hidden(self) -> torch.Tensor | None:
        """The answer's witness for the uncertainty head: the pre-norm hidden state, at the last prompt position,
        of the head whose first token was emitted (the drafter if accepted, else the verifier favouring the
        emitted token; the decoding head in single / naive mode). None before the first token or on abstention."""
        return self.witness.get("hidden")

    def advance(self, result: Any = None) -> tuple[list[Event], Op | None]:
        """Give the last op's result (None at the start); get the events it decided and the next op (None: the
        answer is complete). The events are not yet part of ``output``: ``deliver`` each one as it is handed on,
        so that an answer stopped between two events holds exactly those handed on."""
        events: list[Event] = []
        item: Op | Event | None
        try:
            item = self._work.send(result)  # at the start: send(None), the same as next()
            while isinstance(item, TokenEvent | Ended):
                events.append(item)
                item = next(self._work)
        except StopIteration:
            item = None
        return events, item

    def deliver(self, event: Event) -> None:
        """Fold an event into ``output``: tokens, signals, and the counts of rounds, drafts and acceptances."""
        output = self.output
        output.n_rounds = event.round + 1
        if isinstance(event, Ended):
            output.finish_reason = event.reason
            if event.reason == "abstain":  # the jury refused the round's next draft and allowed nothing
                output.abstained = True
                output.n_drafted += 1
            return
        self.fold.add(event)
        if self.decoder.settings.mode == "poe":
            output.n_drafted += 1
            output.n_accepted += not event.resampled

    def stop(self) -> None:
        """End the answer early (its client left, its time ran out): held-back text and elapsed time, no
        p(correct) of an unfinished answer. Idempotent."""
        if self.done:
            return
        self.done = True
        self._work.close()
        self.fold.close()
        self.output.elapsed_s = time.perf_counter() - self.started

    def finish(self) -> None:
        """Close the complete answer: as ``stop``, and p(correct) for multiple choice. Idempotent."""
        if self.done:
            return
        self.stop()
        output, decoder = self.output, self.decoder
        if self.is_mcq and decoder.uncertainty_head_idx is not None and "hidden" in self.witness:
            question = self.conversation[-1]["content"]
            output.uncertainty = decoder.get_uncertainty_score(question, output.text, self.witness["hidden"])

    # ----- decoding loops: generators of ops and events ---------------------------------------------------------

    def _poe_rounds(self) -> Iterator[Any]:
        decoder, settings = self.decoder, self.decoder.settings
        prompt_ids, slot, temperature, seed = self.prompt_ids, self.slot, self.temperature, self.seed
        draft, verifiers, vocab = self.draft, self.verifiers, decoder.vocab_limit
        yield Prefill(slot, prompt_ids[:-1], range(decoder.n_llm_heads))
        decided = len(prompt_ids)  # L: tokens decided so far; caches hold L - 1 positions
        pending = prompt_ids[-1]
        emitted = 0
        round_index = -1
        compiled = None  # with settings.compile: the draft tower's compiled step, after the first (eager) one
        while emitted < settings.max_new_tokens:
            round_index += 1
            g = min(round_gamma(settings.gamma, settings.first_gamma, round_index), settings.max_new_tokens - emitted)
            # DRAFT: g steps of trunk + draft head, keeping the trunk states for the verifiers.
            trunk_states, draft_logits, drafts = [], [], []
            token = pending
            for k in range(g):
                position = decided - 1 + k  # of the token the step reads
                if compiled is not None:
                    # Its window holds the trunk's and the draft head's keys and values, which only draft steps
                    # read; after a rejection the next round writes over the stale positions, as in the cache.
                    logits, trunk_state = yield Local(partial(compiled.draft_step, token, position))
                    logits = logits[:vocab]
                else:
                    step = yield Step(slot, token, position, range(draft, draft + 1), draft=True)
                    logits, trunk_state = step.logits[0, :vocab], step.trunk_state
                    if k == 0 and decided == len(prompt_ids):
                        self.witness["draft"] = step.hidden[0]
                        if settings.compile:  # after the first (eager) step, which also gave the witness state
                            compiled = decoder.model.compiled_tower(draft, len(prompt_ids) + settings.max_new_tokens)
                            compiled.load_cache(self.cache, slot, position + 1)
                token = sample_from_logits(logits, temperature, seed, decided + k, Purpose.SAMPLE)
                trunk_states.append(trunk_state)
                draft_logits.append(logits)
                drafts.append(token)
                if token in decoder.stop_ids:
                    break  # positions after a drafted end of text are never needed
            g = len(drafts)
            # VERIFY: one batched pass of the verifiers over the g saved trunk states.
            verified = yield Verify(slot, torch.stack(trunk_states), decided - 1, verifiers, 2 * settings.gamma)
            verifier_logits = verified.logits[:, :, :vocab]
            target, allowed = jury_distribution(verifier_logits, temperature, settings.beta, settings.veto_threshold)
            q = torch.softmax(torch.stack(draft_logits).float() / temperature, dim=-1) if temperature > 0 else None
            signals = position_signals(verifier_logits, target, settings.top_logprobs)
            check_finite(signals, verifier_logits, verifiers, decided)
            # DECIDE position by position; stop at the first rejection.
            for j in range(g):
                position = decided + j
                if not allowed[j]:
                    yield Ended("abstain", round_index)
                    return
                decision = speculative_decision(
                    target[j], q[j] if q is not None else None, drafts[j], temperature, seed, position
                )
                if position == len(prompt_ids):
                    self._keep_witness(decision, verifier_logits, verified.hidden, verifiers)
                event = signals.event(emitted, position, j, decision.token)
                event.round, event.drafted = round_index, g
                if not decision.accepted:
                    event.resampled = True
                    event.draft_token_id = drafts[j]
                    event.validity_radius = validity_radius(signals.votes[j], drafts[j])
                    event.suppression_score = float(target[j, drafts[j]])
                emitted += 1
                yield event
                if decision.token in decoder.stop_ids:
                    yield Ended("eos", round_index)
                    return
                if not decision.accepted:
                    # a rollback: the next round writes from this position on, over the stale entries
                    pending = decision.token
                    decided = position + 1
                    break
            else:
                pending = drafts[-1]
                decided += g

    def _plain_steps(self) -> Iterator[Any]:
        """Single-head or naive-averaging decoding: every step runs the trunk and the heads on one token."""
        decoder, settings = self.decoder, self.decoder.settings
        prompt_ids, slot, temperature, seed = self.prompt_ids, self.slot, self.temperature, self.seed
        heads = self.verifiers
        head_range = range(heads[0], heads[-1] + 1)
        yield Prefill(slot, prompt_ids[:-1], head_range)
        token = prompt_ids[-1]
        compiled = None
        for emitted in range(settings.max_new_tokens):
            position = len(prompt_ids) + emitted
            if compiled is not None:  # the token sits at position - 1
                logits = yield Local(partial(compiled.step, token, position - 1))
                head_logits = logits[: decoder.vocab_limit].view(1, 1, -1)
            else:
                step = yield Step(slot, token, position - 1, head_range)
                head_logits = step.logits[:, : decoder.vocab_limit].unsqueeze(1)  # (n, 1, vocab)
                if emitted == 0:
                    self.witness["hidden"] = step.hidden[0]
                    if settings.compile:  # after the first (eager) step, which also gave the witness state
                        compiled = decoder.model.compiled_tower(heads[0], len(prompt_ids) + settings.max_new_tokens)
                        compiled.load_cache(self.cache, slot, position)
            # one head: its logits are the mean's bits; torch's mean over a dimension of one took ~0.7 ms here
            combined = head_logits[0].float() if head_logits.size(0) == 1 else head_logits.float().mean(dim=0)
            token = sample_from_logits(combined[0], temperature, seed, position, Purpose.SAMPLE)
            scale = temperature if temperature > 0 else 1.0
            signals = position_signals(head_logits, torch.softmax(combined / scale, dim=-1), settings.top_logprobs)
            check_finite(signals, head_logits, heads, position)
            event = signals.event(emitted, position, 0, token)
            event.round = emitted
            yield event
            if token in decoder.stop_ids:
                yield Ended("eos", emitted)
                return

    def _keep_witness(
        self, decision: Any, verifier_logits: torch.Tensor, verifier_hidden: torch.Tensor, verifiers: list[int]
    ) -> None:
        """The hidden state whose head 'answered' the first token: the drafter if accepted, else the
        verifier giving the emitted token the highest logit."""
        if decision.accepted:
            self.witness["hidden"] = self.witness["draft"]
        else:
            best = int(torch.argmax(verifier_logits[:, 0, decision.token]))
            self.witness["hidden"] = verifier_hidden[best, 0]


@dataclass
class PositionSignals:
    """Per-position trust signals of a block of positions, moved to the host once."""

    entropies: list[float]
    margins: list[float]
    votes: list[list[int]]  # votes[j] = each head's argmax at position j
    # With log-probabilities asked for: the block's distributions (left where they were computed: an emitted
    # token's probability is read alone), and each position's most likely (token id, log-probability).
    target: torch.Tensor | None = None
    top: list[list[tuple[int, float]]] | None = None

    def event(self, index: int, position: int, j: int, token: int) -> TokenEvent:
        return TokenEvent(
            index=index,
            position=position,
            token_id=token,
            text="",
            entropy=self.entropies[j],
            stability_radius=stability_radius(self.votes[j], token),
            stability_margin=self.margins[j],
            logprob=None if self.target is None else _log(float(self.target[j, token])),
            top_logprobs=None if self.top is None else self.top[j],
        )


def check_finite(signals: PositionSignals, head_logits: torch.Tensor, heads: list[int], first: int) -> None:
    """Refuse a block whose distribution is not finite (its entropy, on the host already, is NaN exactly then),
    naming the heads whose logits were not: NaN logits made every token 0 with NaN signals, silently. (A drafter's
    NaN needs no check: its drafts are the jury's to reject, and the jury resamples from its own distribution.)"""
    bad = next((j for j, e in enumerate(signals.entropies) if math.isnan(e)), None)
    if bad is None:
        return
    finite = torch.isfinite(head_logits[:, bad]).all(dim=-1).tolist()
    named = [h for h, ok in zip(heads, finite, strict=True) if not ok]
    which = f"head(s) {named} gave" if named else "the heads' combined scores gave"
    where = f"at position {first + bad}"
    raise NonFiniteLogitsError(f"{which} non-finite logits (NaN or infinity) {where}: {NON_FINITE_CAUSE}")


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf  # probability 0: vetoed (or below float32's smallest)


def position_signals(
    head_logits: torch.Tensor, target: torch.Tensor, top_logprobs: int | None = None
) -> PositionSignals:
    """head_logits (n_heads, positions, vocab), target (positions, vocab): the distribution each token is decided
    from. ``top_logprobs`` (None: none) makes events carry log-probabilities under ``target``."""
    votes = argmax_last(head_logits).t().tolist()
    signals = PositionSignals(entropy_nats(target).tolist(), top2_margin(target).tolist(), votes)
    if top_logprobs is not None:
        signals.target = target
        k = min(top_logprobs, target.size(-1))
        probs, ids = torch.topk(target.float(), k, dim=-1)  # one top-k and one transfer for the whole block
        signals.top = [
            [(i, _log(p)) for i, p in zip(row_ids, row_probs, strict=True)]
            for row_ids, row_probs in zip(ids.tolist(), probs.tolist(), strict=True)
        ]
    return signals
