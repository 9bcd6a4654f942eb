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
  draft is pending; on a rejection at ``L+j`` all caches are synced to ``L+j``
  and the resampled token is pending.

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
from typing import Any, Literal

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.jury import check_veto_threshold, jury_distribution, speculative_decision
from olmo_tap.inference.metrics import entropy_nats, stability_radius, top2_margin, validity_radius
from olmo_tap.inference.prompts import encode_chat, normalise_messages, stop_token_ids, uncertainty_prompt
from olmo_tap.inference.sampling import Purpose, check_temperature, head_for_seed, sample_from_logits
from olmo_tap.inference.text import TextStream
from olmo_tap.weights.tokenizer import vocab_limit

Mode = Literal["poe", "naive", "single"]
MODES: tuple[str, ...] = ("poe", "naive", "single")
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """Iterate to receive TokenEvents as they are decided; ``output`` is complete afterwards."""

    def __init__(
        self,
        events: Iterator[TokenEvent],
        output: PoEOutput,
        finish: Callable[[], None],
        witness: dict[str, torch.Tensor],
    ) -> None:
        self._events = events
        self.output = output
        self._finish = finish
        self._witness = witness

    @property
    def witness_hidden(self) -> torch.Tensor | None:
        """The answer's witness for the uncertainty head: the pre-norm hidden state, at the last prompt position,
        of the head whose first token was emitted (the drafter if accepted, else the verifier favouring the
        emitted token; the decoding head in single / naive mode). None before the first token or on abstention."""
        return self._witness.get("hidden")

    def __iter__(self) -> Iterator[TokenEvent]:
        yield from self._events
        self._finish()


class PoE:
    """Decoder for a Hydra: PoE speculative verification, or plain single-head / naive-averaging decoding.

    :param model: the Hydra, weights loaded.
    :param tokenizer: its tokenizer (chat template used for prompts).
    :param n_llm_heads: text heads (default: every head but the uncertainty head, if the model has one).
    :param gamma: draft tokens per round (a pure speed knob: the output does not depend on it).
    :param beta: inverse temperature applied to the verifiers' summed log-probabilities.
    :param max_new_tokens: bound on the response length.
    :param seed: seed of every random draw (None: a fresh random seed, reported in the output).
    :param veto_threshold: tau in [0, 1): a token any verifier gives probability < tau is never emitted;
        None keeps the original soft PoE.
    :param draft_head: fixed draft head (None: chosen from the seed).
    :param mode: "poe", "naive" (average all text heads' logits every step) or "single" (one head).
    :param head: the head used by mode "single" (default: the draft head).
    :param ignore_eos: keep going past end-of-text (fixed-length runs for benchmarks).
    :param compile: mode "single" only: decode with the tower's step compiled to native code
        (``olmo_tap.model.compiled``): same tokens, faster steps, a one-off compile of about a minute on CPU.
    :param top_logprobs: None: no log-probabilities (nothing computed); 0 to 20: each TokenEvent carries its
        token's log-probability under the distribution it was decided from, and that many most likely tokens.
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
        seed: int | None = None,
        veto_threshold: float | None = None,
        draft_head: int | None = None,
        mode: Mode = "poe",
        head: int | None = None,
        ignore_eos: bool = False,
        compile: bool = False,
        top_logprobs: int | None = None,
    ) -> None:
        if n_llm_heads is None:
            n_llm_heads = model.n_text_heads
        if not isinstance(n_llm_heads, int) or not 1 <= n_llm_heads <= model.n_heads:
            raise ValueError(f"n_llm_heads must be between 1 and the model's {model.n_heads} heads, got {n_llm_heads}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "poe" and n_llm_heads < 2:
            raise ValueError(f"PoE needs at least 2 text heads (one drafts, the rest verify); got {n_llm_heads}")
        if compile and mode != "single":
            raise ValueError(f"compile applies to mode 'single' only (one head per step), not {mode!r}")
        if not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        for name, value in (("draft_head", draft_head), ("head", head)):
            if value is not None and not 0 <= value < n_llm_heads:
                raise ValueError(f"{name} {value} out of range for {n_llm_heads} text heads")
        if top_logprobs is not None and (not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20):
            raise ValueError(f"top_logprobs must be None or an integer in [0, 20], got {top_logprobs!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.n_llm_heads = n_llm_heads
        self.uncertainty_head_idx = n_llm_heads if model.n_heads > n_llm_heads else None
        self.gamma = gamma
        self.beta = float(beta)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.veto_threshold = check_veto_threshold(veto_threshold)
        self.draft_head = draft_head
        self.mode: Mode = mode
        self.head = head
        self.compile = compile
        self.top_logprobs = top_logprobs
        self.vocab_limit = vocab_limit(tokenizer, model.base_config.vocab_size)
        self.stop_ids = frozenset() if ignore_eos else stop_token_ids(tokenizer, model.base_config.eos_token_id)
        # compared once per decoder: equal weights short-circuit nothing, different ones stop at the first tensor
        self.independent_heads = not model.identical_heads(range(n_llm_heads))
        self.A_id = tokenizer.encode("A", add_special_tokens=False)[0]
        self.B_id = tokenizer.encode("B", add_special_tokens=False)[0]

    # ----- public API -----------------------------------------------------------------------------------------

    def choose_draft_head(self, seed: int) -> int:
        """The draft head: the fixed one, or one derived from the seed (so a transcript can be replayed)."""
        if self.draft_head is not None:
            return self.draft_head
        return head_for_seed(seed, self.n_llm_heads)

    def stream(
        self,
        prompt_text: str | None = None,
        is_mcq: bool = False,
        temperature: float | None = 0.98,
        messages: list[dict[str, Any]] | None = None,
        seed: int | None = None,
        prompt_ids: list[int] | None = None,
    ) -> PoEStream:
        """Start decoding; iterate the result for TokenEvents, then read its ``output``.

        ``prompt_ids`` (already templated token ids) replace the prompt text when given.
        """
        temperature = check_temperature(temperature)
        if prompt_ids is not None:
            prompt_ids = [int(i) for i in prompt_ids]
            if not prompt_ids or not all(0 <= i < self.vocab_limit for i in prompt_ids):
                raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {self.vocab_limit})")
            conversation = [{"role": "user", "content": self.tokenizer.decode(prompt_ids, skip_special_tokens=True)}]
        else:
            conversation = normalise_messages(prompt_text, messages)
            prompt_ids = encode_chat(self.tokenizer, messages=conversation)
        context = self.model.base_config.max_seq_len
        if len(prompt_ids) + self.max_new_tokens > context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the model's "
                f"context of {context} tokens"
            )
        if seed is None:
            seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        draft = self.choose_draft_head(seed)
        single = self.head if self.head is not None else draft
        if self.mode == "poe":
            decider, verifiers = draft, [h for h in range(self.n_llm_heads) if h != draft]
        elif self.mode == "naive":
            decider, verifiers = None, list(range(self.n_llm_heads))
        else:
            decider, verifiers = single, [single]
        output = new_output(
            self.tokenizer,
            prompt_ids,
            decider,
            verifiers,
            {
                "mode": self.mode,
                "seed": seed,
                "temperature": temperature,
                "gamma": self.gamma,
                "beta": self.beta,
                "veto_threshold": self.veto_threshold,
                "draft_head": decider,
                "n_llm_heads": self.n_llm_heads,
                "max_new_tokens": self.max_new_tokens,
                "vocab_limit": self.vocab_limit,
                "stop_ids": sorted(self.stop_ids),
                # the Hydra's split, so an audit can rebuild the same jury from the base checkpoint
                "n_heads": self.model.n_heads,
                "heads_depth": self.model.config.head_layers,
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "device": str(self.model.device),
                "compile": self.compile,  # compiled steps round differently: the audit then allows near-ties
                # products of a few rows sum in another order with another thread count: an exact replay needs it
                "threads": torch.get_num_threads(),
                # multiple choice: the question the uncertainty head scores, so an audit can re-score it
                "mcq": bool(is_mcq),
                "question": conversation[-1]["content"] if is_mcq else None,
            },
        )
        output.whole_jury = self.mode == "poe" and self.n_llm_heads == self.model.n_text_heads
        output.independent_heads = self.independent_heads
        witness: dict[str, torch.Tensor] = {}
        started = time.perf_counter()

        def events() -> Iterator[TokenEvent]:
            fold = OutputFold(output, self.tokenizer)
            decide = self._poe_rounds if self.mode == "poe" else self._plain_steps
            with torch.no_grad():
                for event in decide(prompt_ids, temperature, seed, verifiers, draft, witness, output):
                    fold.add(event)
                    yield event
            fold.close()

        def finish() -> None:
            output.elapsed_s = time.perf_counter() - started
            if is_mcq and self.uncertainty_head_idx is not None and "hidden" in witness:
                question = conversation[-1]["content"]
                output.uncertainty = self.get_uncertainty_score(question, output.text, witness["hidden"])

        return PoEStream(events(), output, finish, witness)

    def generate_with_cache(
        self,
        prompt_text: str | None = None,
        is_mcq: bool = False,
        temperature: float | None = 0.98,
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

    @torch.no_grad()
    def get_uncertainty_score(
        self, prompt_text: str, full_answer_text: str, witness_hidden_state: torch.Tensor
    ) -> float:
        """p(correct) of a multiple-choice answer from the uncertainty head: sigmoid(logit A - logit B).

        The witness head's hidden state at the last prompt position is injected into the residual
        stream at the last position of the second-pass prompt. Runs uncached: the generation
        caches and their lengths are left as they were.
        """
        if self.uncertainty_head_idx is None:
            raise ValueError("this model has no uncertainty head (it must be the last head, after the text heads)")
        ids = torch.tensor(
            [encode_chat(self.tokenizer, uncertainty_prompt(prompt_text, full_answer_text))], device=self.model.device
        )
        residual = torch.zeros(
            1, ids.size(1), self.model.base_config.d_model, device=ids.device, dtype=self.model.dtype
        )
        residual[0, -1] = witness_hidden_state.reshape(-1).to(residual.dtype)
        logits = self.model(
            ids, residual=residual, head_indices=[self.uncertainty_head_idx], last_token_only=True, use_cache=False
        )[0, 0, 0].float()
        return float(torch.sigmoid(logits[self.A_id] - logits[self.B_id]))

    # ----- decoding loops -------------------------------------------------------------------------------------

    def _prefill(self, prompt_ids: list[int], heads: list[int], extra_positions: int) -> None:
        """Cache the prompt except its last token (which is pending) in the trunk and ``heads``."""
        model = self.model
        model.init_kv_cache(1, len(prompt_ids) + extra_positions, omit_last=self.uncertainty_head_idx is not None)
        if len(prompt_ids) > 1:
            hidden = model.forward_trunk(torch.tensor([prompt_ids[:-1]]))  # host ids: see forward_trunk
            model.head_hidden_states(hidden, heads)

    def _draft_step(self, token: int, draft: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one token through trunk + draft head: (trunk state, draft head hidden, draft logits)."""
        model = self.model
        trunk_state = model.forward_trunk(torch.tensor([[token]]))
        hidden = model.head_hidden_states(trunk_state, [draft])
        logits = model.project(hidden)[0, 0, 0, : self.vocab_limit]
        return trunk_state, hidden, logits

    def _poe_rounds(
        self,
        prompt_ids: list[int],
        temperature: float,
        seed: int,
        verifiers: list[int],
        draft: int,
        witness: dict[str, torch.Tensor],
        output: PoEOutput,
    ) -> Iterator[TokenEvent]:
        model = self.model
        self._prefill(prompt_ids, list(range(self.n_llm_heads)), self.max_new_tokens)
        decided = len(prompt_ids)  # L: tokens decided so far; caches hold L - 1 positions
        pending = prompt_ids[-1]
        emitted = 0
        while emitted < self.max_new_tokens:
            g = min(self.gamma, self.max_new_tokens - emitted)
            output.n_rounds += 1
            # DRAFT: g steps of trunk + draft head, keeping the trunk states for the verifiers.
            trunk_states, draft_logits, drafts = [], [], []
            token = pending
            for k in range(g):
                trunk_state, hidden, logits = self._draft_step(token, draft)
                if k == 0 and decided == len(prompt_ids):
                    witness["draft"] = hidden[0, 0, -1]
                token = sample_from_logits(logits, temperature, seed, decided + k, Purpose.SAMPLE)
                trunk_states.append(trunk_state)
                draft_logits.append(logits)
                drafts.append(token)
                if token in self.stop_ids:
                    break  # positions after a drafted end of text are never needed
            g = len(drafts)
            # VERIFY: one batched pass of every verifier over the g saved trunk states.
            verifier_hidden = model.head_hidden_states(torch.cat(trunk_states, dim=1), verifiers)
            verifier_logits = model.project(verifier_hidden)[:, 0, :, : self.vocab_limit]
            target, allowed = jury_distribution(verifier_logits, temperature, self.beta, self.veto_threshold)
            q = torch.softmax(torch.stack(draft_logits).float() / temperature, dim=-1) if temperature > 0 else None
            signals = position_signals(verifier_logits, target, self.top_logprobs)
            # DECIDE position by position; stop at the first rejection.
            for j in range(g):
                position = decided + j
                output.n_drafted += 1
                if not allowed[j]:
                    output.abstained, output.finish_reason = True, "abstain"
                    return
                decision = speculative_decision(
                    target[j], q[j] if q is not None else None, drafts[j], temperature, seed, position
                )
                if position == len(prompt_ids):
                    self._keep_witness(witness, decision, verifier_logits, verifier_hidden, verifiers)
                event = signals.event(emitted, position, j, decision.token)
                if decision.accepted:
                    output.n_accepted += 1
                else:
                    event.resampled = True
                    event.draft_token_id = drafts[j]
                    event.validity_radius = validity_radius(signals.votes[j], drafts[j])
                    event.suppression_score = float(target[j, drafts[j]])
                emitted += 1
                yield event
                if decision.token in self.stop_ids:
                    output.finish_reason = "eos"
                    return
                if not decision.accepted:
                    model.sync_kv_cache(position)
                    pending = decision.token
                    decided = position + 1
                    break
            else:
                pending = drafts[-1]
                decided += g

    def _plain_steps(
        self,
        prompt_ids: list[int],
        temperature: float,
        seed: int,
        heads: list[int],
        draft: int,
        witness: dict[str, torch.Tensor],
        output: PoEOutput,
    ) -> Iterator[TokenEvent]:
        """Single-head or naive-averaging decoding: every step runs the trunk and ``heads`` on one token."""
        model = self.model
        self._prefill(prompt_ids, heads, self.max_new_tokens)
        token = prompt_ids[-1]
        compiled = None
        for emitted in range(self.max_new_tokens):
            position = len(prompt_ids) + emitted
            if compiled is not None:  # the token sits at position - 1
                head_logits = compiled.step(token, position - 1)[: self.vocab_limit].view(1, 1, -1)
            else:
                trunk_state = model.forward_trunk(torch.tensor([[token]]))
                hidden = model.head_hidden_states(trunk_state, heads)
                head_logits = model.project(hidden)[:, 0, :, : self.vocab_limit]  # (n, 1, vocab)
            if emitted == 0:
                witness["hidden"] = hidden[0, 0, -1]
                if self.compile:  # after the first (eager) step, which also gave the witness state
                    compiled = model.compiled_tower(heads[0], len(prompt_ids) + self.max_new_tokens)
                    compiled.load_cache(position)
            combined = head_logits.float().mean(dim=0)
            token = sample_from_logits(combined[0], temperature, seed, position, Purpose.SAMPLE)
            scale = temperature if temperature > 0 else 1.0
            signals = position_signals(head_logits, torch.softmax(combined / scale, dim=-1), self.top_logprobs)
            output.n_rounds += 1
            yield signals.event(emitted, position, 0, token)
            if token in self.stop_ids:
                output.finish_reason = "eos"
                return

    @staticmethod
    def _keep_witness(
        witness: dict[str, torch.Tensor],
        decision: Any,
        verifier_logits: torch.Tensor,
        verifier_hidden: torch.Tensor,
        verifiers: list[int],
    ) -> None:
        """The hidden state whose head 'answered' the first token: the drafter if accepted, else the
        verifier giving the emitted token the highest logit."""
        if decision.accepted:
            witness["hidden"] = witness["draft"]
        else:
            best = int(torch.argmax(verifier_logits[:, 0, decision.token]))
            witness["hidden"] = verifier_hidden[best, 0, 0]


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


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf  # probability 0: vetoed (or below float32's smallest)


def position_signals(
    head_logits: torch.Tensor, target: torch.Tensor, top_logprobs: int | None = None
) -> PositionSignals:
    """head_logits (n_heads, positions, vocab), target (positions, vocab): the distribution each token is decided
    from. ``top_logprobs`` (None: none) makes events carry log-probabilities under ``target``."""
    votes = head_logits.argmax(dim=-1).t().tolist()
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
