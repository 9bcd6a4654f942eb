"""Greedy Coordinate Gradient (Zou et al. 2023): adversarial suffixes that flip a multiple-choice answer.

A suffix of ``suffix_tokens`` tokens is appended (after one space) to the user's question. Its target is the
answer letter of the jury (the text heads' summed log-probabilities, PoE's product of experts) or of one head,
read at the first answer position over the option letters A-D. The letter the target picks without the suffix
is the *clean* letter c; a suffix flips the question when another letter wins. The loss of one question is the
margin ``s(c) - max_{l != c} s(l)`` of the letter scores, floored at ``-kappa`` (once a question is flipped by
``kappa`` it stops pulling: the other questions get the steps, Carlini-Wagner's trick); a suffix is optimised on
several questions at once (the sum of their losses: Zou's multi-prompt variant, for suffixes that transfer).

One step, as in the paper:

1. the gradient of the loss with respect to the one-hot suffix tokens (through the embedding matrix);
2. per position the ``top_k`` tokens with the most negative gradient, among the allowed tokens (printable ASCII,
   no special tokens; the first token starts with a space, so that "question + ' ' + text" re-tokenises to the
   optimised ids);
3. ``candidates`` copies of the suffix, each with one position replaced by one of its top-k tokens, drawn by a
   generator seeded from (seed, entry, step); a candidate whose text would re-tokenise differently is dropped;
4. every candidate's loss in one batched pass that reuses each question's prompt from a KV cache (computed once
   per entry and copied to the candidates' slots);
5. the best candidate becomes the suffix (it may be worse than the current one: GCG always moves); the best
   suffix seen is the result. An entry stops early when every question is flipped by ``kappa``.

Deterministic for a seed on a given arithmetic (``olmo-tap train attacks`` pins it, as the default jury's
training does); every entry records the suffix after each step (``trace``), so a short rerun can be checked
against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from olmo_tap.hydra import HydraTransformer
from olmo_tap.inference.prompts import encode_chat
from olmo_tap.model.kv_cache import HydraCache, Rows
from olmo_tap.robustness.settings import GCGSettings, parse_target
from olmo_tap.train.mcq import LETTERS, MCQ, format_mcq


def question_digest(question: MCQ) -> str:
    return hashlib.sha256(format_mcq(question).encode("utf-8")).hexdigest()[:16]


def attacked_text(question: str, suffix: str) -> str:
    """The user's message with a suffix appended: what the bank's suffixes are made for and the probe sends."""
    return f"{question} {suffix}"


@dataclass
class Prompt:
    """One question's prompt split around the suffix: ``prefix`` (everything up to the question's end), ``tail``
    (the chat template's end of turn and the assistant's generation prompt)."""

    question: MCQ
    prefix: list[int]
    tail: list[int]


def split_prompt(tokenizer: Any, question: MCQ) -> Prompt:
    """Where the suffix goes in the question's token ids: between the question and the template's tail."""
    text = format_mcq(question)
    plain = encode_chat(tokenizer, text)
    marked = encode_chat(tokenizer, attacked_text(text, "!"))
    tail = 0
    while tail < len(plain) - 1 and plain[-1 - tail] == marked[-1 - tail]:
        tail += 1
    return Prompt(question, plain[: len(plain) - tail], plain[len(plain) - tail :])


class Attack:
    """GCG against one model and tokenizer: the allowed tokens, the letters, the target heads."""

    def __init__(self, model: HydraTransformer, tokenizer: Any, settings: GCGSettings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        head = parse_target(settings.target)
        n_text = model.n_text_heads
        if head is not None and not 0 <= head < n_text:
            raise ValueError(f"attack target head {head} is not one of the {n_text} text heads")
        self.heads = list(range(n_text)) if head is None else [head]
        # The gradient is wanted for the input tokens only, never for the weights (it would cost a weight-sized
        # buffer per parameter and the time to fill it).
        model.requires_grad_(False)
        self.letters = [self._single_token(letter) for letter in LETTERS]

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits the option letter {text!r} into {len(ids)} tokens")
        return ids[0]

    @cached_property
    def allowed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks over the vocabulary: tokens allowed anywhere, and at the first position."""
        vocab = self.model.base_config.vocab_size
        anywhere = torch.zeros(vocab, dtype=torch.bool)
        first = torch.zeros(vocab, dtype=torch.bool)
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        for i in range(min(vocab, len(self.tokenizer))):
            if i in special:
                continue
            text = self.tokenizer.decode([i])
            if text and text.isascii() and text.isprintable() and text.strip():
                anywhere[i] = True
                first[i] = text[0] == " " and text[1:2] != " "
        return anywhere, first

    def suffix_text(self, ids: Sequence[int]) -> str | None:
        """The text of suffix ``ids`` (without the separating space), or None if it would not re-tokenise to
        exactly ``ids`` after the space."""
        text = self.tokenizer.decode(list(ids))
        if not text.startswith(" ") or self.tokenizer.encode(text, add_special_tokens=False) != list(ids):
            return None
        return text[1:]

    def initial_suffix(self) -> list[int]:
        """Zou's start: " ! ! ! ..." (``suffix_tokens`` tokens)."""
        ids = self.tokenizer.encode(" !" * self.settings.suffix_tokens, add_special_tokens=False)
        if len(ids) != self.settings.suffix_tokens or self.suffix_text(ids) is None:
            raise ValueError("the tokenizer does not encode ' !' as one token; GCG's start needs another filler")
        return ids

    # ----- the target's letter scores ------------------------------------------------------------------------

    def letter_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(heads, rows, vocab) logits at the answer position -> (rows, 4) summed log-probs of the letters."""
        dtype = torch.promote_types(logits.dtype, torch.float32)  # half precision promoted; float64 kept
        return torch.log_softmax(logits, dim=-1, dtype=dtype)[..., self.letters].sum(0)

    def margins(self, scores: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """s(clean) - max over the other letters, per row."""
        own = scores.gather(1, clean[:, None])[:, 0]
        others = scores.masked_fill(torch.nn.functional.one_hot(clean, len(LETTERS)).bool(), float("-inf"))
        return own - others.max(dim=1).values

    def _project_last(self, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Heads' pre-norm states (heads, tokens, d) -> logits at each row's last token (heads, rows, vocab)."""
        ends = torch.tensor([sum(rows.lengths[: i + 1]) - 1 for i in range(len(rows.lengths))])
        return self.model.project(hidden[:, ends, :])

    @torch.no_grad()
    def clean_letters(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """The target's letter for each question without a suffix."""
        letters = []
        for p in prompts:
            ids = torch.tensor([p.prefix + p.tail])
            logits = self.model(ids, head_indices=self.heads, last_token_only=True)[:, :, -1]
            letters.append(int(self.letter_scores(logits).argmax(-1)))
        return torch.tensor(letters)

    # ----- one step ------------------------------------------------------------------------------------------

    def gradient(self, prompts: Sequence[Prompt], clean: torch.Tensor, suffix: list[int]) -> torch.Tensor:
        """d loss / d one-hot suffix tokens, (suffix_tokens, vocab), summed over the questions."""
        model = self.model
        model.require_float_weights("an attack's gradient")
        embed = model.embed.weight
        one_hot = torch.zeros(len(suffix), embed.size(0), dtype=embed.dtype)
        one_hot[torch.arange(len(suffix)), torch.tensor(suffix)] = 1.0
        one_hot.requires_grad_(True)
        with torch.enable_grad():
            suffix_embeds = one_hot @ embed
            total = torch.zeros(())
            for i, p in enumerate(prompts):
                with torch.no_grad():
                    before = model.embed(torch.tensor(p.prefix))
                    after = model.embed(torch.tensor(p.tail))
                x = torch.cat([before, suffix_embeds, after])
                rows = Rows.uniform(1, 0, x.size(0))
                hidden = model.trunk_embedded(x, rows)
                states = model.heads_rows(hidden, range(min(self.heads), max(self.heads) + 1), rows)
                states = states[[h - min(self.heads) for h in self.heads]]
                scores = self.letter_scores(self._project_last(states, rows))
                total = total + self.margins(scores, clean[i : i + 1]).clamp(min=-self.settings.kappa).sum()
            total.backward()
        assert one_hot.grad is not None
        return one_hot.grad

    def propose(self, suffix: list[int], grad: torch.Tensor, generator: torch.Generator) -> list[list[int]]:
        """Up to ``candidates`` distinct single-token swaps among the top-k of each position, re-tokenising."""
        anywhere, first = self.allowed
        k = self.settings.top_k
        grad = grad.clone()
        grad[:, ~anywhere] = float("inf")
        grad[0, ~first] = float("inf")
        top = (-grad).topk(k, dim=1).indices  # (positions, k)
        seen = {tuple(suffix)}
        out: list[list[int]] = []
        tries = 0
        while len(out) < self.settings.candidates and tries < 8 * self.settings.candidates:
            tries += 1
            pos = int(torch.randint(len(suffix), (1,), generator=generator))
            token = int(top[pos, int(torch.randint(k, (1,), generator=generator))])
            candidate = list(suffix)
            candidate[pos] = token
            if tuple(candidate) in seen or self.suffix_text(candidate) is None:
                continue
            seen.add(tuple(candidate))
            out.append(candidate)
        return out

    @torch.no_grad()
    def evaluate(
        self, cache: HydraCache, prompts: Sequence[Prompt], clean: torch.Tensor, candidates: Sequence[list[int]]
    ) -> torch.Tensor:
        """The loss of each candidate (summed over the questions) and its flips: (candidates,), (candidates,)."""
        n = len(candidates)
        ids, slots, starts, lengths = [], [], [], []
        for q, p in enumerate(prompts):
            for c, candidate in enumerate(candidates):
                ids.extend(candidate + p.tail)
                slots.append(q * self.settings.candidates + c)
                starts.append(len(p.prefix))
                lengths.append(len(candidate) + len(p.tail))
        rows = Rows.of(slots, starts, lengths)
        hidden = self.model.trunk_rows(torch.tensor(ids), rows, cache)
        run = range(min(self.heads), max(self.heads) + 1)
        states = self.model.heads_rows(hidden, run, rows, cache)[[h - run.start for h in self.heads]]
        scores = self.letter_scores(self._project_last(states, rows))
        margins = self.margins(scores, clean.repeat_interleave(n)).view(len(prompts), n)
        losses = margins.clamp(min=-self.settings.kappa).sum(0)
        flips = (margins < 0).sum(0)
        return torch.stack([losses, flips.to(losses.dtype)])

    @torch.no_grad()
    def prompt_cache(self, prompts: Sequence[Prompt]) -> HydraCache:
        """Each question's prefix computed once and copied into the slots of its candidates."""
        b = self.settings.candidates
        longest = max(len(p.prefix) + len(p.tail) for p in prompts) + self.settings.suffix_tokens
        cache = HydraCache(self.model, b * len(prompts), longest, heads=max(self.heads) + 1)
        for q, p in enumerate(prompts):
            slot = q * b
            rows = Rows.of([slot], [0], [len(p.prefix)])
            hidden = self.model.trunk_rows(torch.tensor(p.prefix), rows, cache)
            self.model.heads_rows(hidden, range(0, max(self.heads) + 1), rows, cache)
            cache.copy_prefix(slot, range(slot + 1, slot + b), len(p.prefix))
        return cache

    def run(
        self,
        questions: Sequence[MCQ],
        entry_seed: int,
        steps: int | None = None,
        on_step: Callable[[int, float, int], None] | None = None,
    ) -> dict[str, Any]:
        """Optimise one suffix on ``questions``: ``{"token_ids", "suffix", "loss", "flips", "steps", "trace"}``
        (``trace``: the suffix after each step; ``flips``: questions flipped by the best suffix, by the letter
        scores at the answer position)."""
        prompts = [split_prompt(self.tokenizer, q) for q in questions]
        clean = self.clean_letters(prompts)
        cache = self.prompt_cache(prompts)
        generator = torch.Generator().manual_seed(entry_seed)
        suffix = self.initial_suffix()
        losses_flips = self.evaluate(cache, prompts, clean, [suffix])
        best = (float(losses_flips[0, 0]), int(losses_flips[1, 0]), list(suffix))
        trace: list[list[int]] = []
        n_steps = self.settings.steps if steps is None else steps
        done = 0
        for step in range(n_steps):
            grad = self.gradient(prompts, clean, suffix)
            candidates = self.propose(suffix, grad, generator)
            if not candidates:
                break
            losses, flips = self.evaluate(cache, prompts, clean, candidates)
            i = int(losses.argmin())
            suffix = candidates[i]
            trace.append(list(suffix))
            done = step + 1
            if float(losses[i]) < best[0]:
                best = (float(losses[i]), int(flips[i]), list(suffix))
            if on_step is not None:
                on_step(step, best[0], best[1])
            if best[0] <= -self.settings.kappa * len(prompts):  # every question flipped by kappa
                break
        loss, flips, ids = best
        text = self.suffix_text(ids)
        assert text is not None  # every candidate was checked
        return {"token_ids": ids, "suffix": text, "loss": loss, "flips": flips, "steps": done, "trace": trace}
