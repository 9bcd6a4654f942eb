"""How much one answer supports another: the semantic similarity behind Kernel Language Entropy and the claims.

A similarity scores ordered pairs ``(premise, hypothesis)`` with a *support* in [0, 1]: how far the premise
entails the hypothesis. KLE's matrix adds both directions, ``W[i, j] = s(i -> j) + s(j -> i)`` in [0, 2], and two
answers with the same text (after stripping whitespace) get 2 without being scored, as in the original.

- ``nli:<model>``: a Hugging Face sequence-classification NLI model (the original's choice, ModernBERT-large-NLI):
  ``P(entailment) + 0.5 P(neutral)``, the original's weighting. Needs the checkpoint (``--nli-model``).
- ``token-overlap``: the share of the hypothesis's content words (lower-cased words and numbers, a short list
  of function words and the question's own words left out) that the premise contains. No model, microseconds.
- ``jury-embedding``: the jury's own hidden states as sentence embeddings: each answer (after the question's
  chat prompt) mean-pooled over its tokens at the text heads' final norm, averaged over the heads; support is
  the cosine, clipped at 0.
- ``jury-judge``: the jury judging entailment by prompt: "does answer 1 say the same as answer 2?", support
  ``p(Yes) / (p(Yes) + p(No))`` from the text heads' mean next-token distribution.

Which one is the default is measured (``results/certainty``): AUROC of the resulting certainty for wrong
answers on the held-out short-answer questions, and the time per answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from olmo_tap.certainty.kle import MAX_SIMILARITY
from olmo_tap.certainty.names import DEFAULT_SIMILARITY, SIMILARITY_NAMES
from olmo_tap.certainty.support import check_support_scores

Pairs = list[tuple[str, str]]

# Words that carry no claim of their own: an answer that only adds them says nothing new.
_FUNCTION_WORDS = (
    "a an the is are was were be been being of in on at to for from by with and or but as it its this "
    "that these those there their they he she his her i you we our your my me do does did so than then "
    "which who whom what when where why how answer"
)
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+", re.UNICODE)


class Similarity(Protocol):
    """A support score of ordered answer pairs; ``name`` is what a transcript records."""

    name: str

    def support(self, pairs: Pairs, question: str) -> list[float]: ...


# A numbered list's markers ("1. ", "2) " at the start of a line) are layout, not claims: without this an answer
# made of nothing but "1. 1. 1." would share its only "word" with every numbered answer.
_LIST_MARKER = re.compile(r"^[ \t]*\d{1,3}[.)](?=\s|$)", re.MULTILINE)


def content_words(text: str) -> set[str]:
    text = _LIST_MARKER.sub(" ", text)
    return {w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in FUNCTION_WORDS}


class TokenOverlap:
    """The share of the hypothesis's content words found in the premise, leaving out the question's words (every
    answer that restates the question shares them, whatever it answers: "The capital of Peru is Lima" and "...
    is Cusco" agree on "capital" and "Peru" only). 1 when the hypothesis has no such word and the premise has
    none either, 0.5 when only the premise has some (it neither supports nor contradicts)."""

    name = "token-overlap"

    def support(self, pairs: Pairs, question: str = "") -> list[float]:
        asked = content_words(question)
        scores = []
        for premise, hypothesis in pairs:
            said, claimed = content_words(premise) - asked, content_words(hypothesis) - asked
            if not claimed:
                scores.append(1.0 if not said else 0.5)
            else:
                scores.append(len(claimed & said) / len(claimed))
        return scores


def symmetric_similarities(similarity: Similarity, pairs: Pairs, question: str = "") -> list[float]:
    """``s(a -> b) + s(b -> a)`` in [0, 2] for each pair ``(a, b)`` (one batched call of ``support``); 2 for two
    texts that are the same after stripping whitespace, without scoring them (as the original does)."""
    scored = [(a, b) for a, b in pairs if a.strip() != b.strip()]
    scores = iter(checked_support(similarity, [d for a, b in scored for d in ((a, b), (b, a))], question))
    return [MAX_SIMILARITY if a.strip() == b.strip() else next(scores) + next(scores) for a, b in pairs]


def similarity_matrix(similarity: Similarity, answers: Sequence[str], question: str = "") -> np.ndarray:
    """KLE's ``W``: ``symmetric_similarities`` of every pair, 0 on the diagonal."""
    n = len(answers)
    w = np.zeros((n, n), dtype=np.float64)
    where = [(i, j) for i in range(n) for j in range(i + 1, n)]
    scores = symmetric_similarities(similarity, [(answers[i], answers[j]) for i, j in where], question)
    for (i, j), score in zip(where, scores, strict=True):
        w[i, j] = w[j, i] = score
    return w


def checked_support(similarity: Similarity, pairs: Pairs, question: str = "") -> list[float]:
    """``similarity.support`` with its promise checked: one score per pair, each in [0, 1]."""
    if not pairs:
        return []
    try:
        return check_support_scores(similarity.support(pairs, question), len(pairs))
    except ValueError as e:
        raise ValueError(f"similarity {similarity.name!r}: {e}") from None


# ----- the jury's own judgement ---------------------------------------------------------------------------------


class JuryEmbedding:
    """Cosine of the answers' mean-pooled hidden states (text heads' final norm, averaged over the heads)."""

    name = "jury-embedding"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def embed(self, text: str, question: str) -> torch.Tensor:
        """The unit-length embedding of ``text`` as an answer to ``question``."""
        from olmo_tap.inference.prompts import encode_chat

        prompt = encode_chat(self.tokenizer, question) if question else []
        answer = self.tokenizer.encode(text, add_special_tokens=False) or [self.model.base_config.eos_token_id]
        ids = torch.tensor([prompt + answer], device=self.model.device)
        heads = list(range(self.model.n_text_heads))
        hidden = self.model.head_hidden_states(self.model.forward_trunk(ids), heads)  # (heads, 1, seq, d)
        pooled = self.model.norm(hidden[:, 0, len(prompt) :]).float().mean(dim=(0, 1))
        return pooled / pooled.norm().clamp_min(1e-12)

    def support(self, pairs: Pairs, question: str = "") -> list[float]:
        # each distinct text embedded once per call (a matrix of N answers asks for each N - 1 times)
        texts = {t for pair in pairs for t in pair}
        vectors = {t: self.embed(t, question) for t in texts}
        return [max(0.0, float(vectors[a] @ vectors[b])) for a, b in pairs]


JUDGE_PROMPT = (
    "Question: {question}\nAnswer 1: {premise}\nAnswer 2: {hypothesis}\n"
    "Does Answer 1 say the same thing as Answer 2? Reply with Yes or No."
)


class JuryJudge:
    """The jury asked whether the premise says the same as the hypothesis: p(Yes) / (p(Yes) + p(No)) of the
    text heads' mean next-token distribution after the prompt ``JUDGE_PROMPT``."""

    name = "jury-judge"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.yes = tokenizer.encode("Yes", add_special_tokens=False)[0]
        self.no = tokenizer.encode("No", add_special_tokens=False)[0]

    @torch.no_grad()
    def support(self, pairs: Pairs, question: str = "") -> list[float]:
        from olmo_tap.inference.prompts import encode_chat

        heads = list(range(self.model.n_text_heads))
        scores = []
        for premise, hypothesis in pairs:
            prompt = JUDGE_PROMPT.format(question=question, premise=premise.strip(), hypothesis=hypothesis.strip())
            ids = torch.tensor([encode_chat(self.tokenizer, prompt)], device=self.model.device)
            logits = self.model(ids, head_indices=heads, last_token_only=True)[:, 0, 0].float()
            probs = torch.softmax(logits, dim=-1).mean(dim=0)
            yes, no = float(probs[self.yes]), float(probs[self.no])
            scores.append(yes / (yes + no) if yes + no > 0 else 0.5)
        return scores


# ----- an NLI cross-encoder -------------------------------------------------------------------------------------


class NLIModel:
    """A Hugging Face sequence-classification NLI checkpoint: support ``P(entailment) + 0.5 P(neutral)``.

    The label order is read from the checkpoint's ``id2label`` (entailment, neutral, contradiction in any order
    and case); a model without those labels is refused."""

    BATCH = 32

    def __init__(self, model_id: str, *, device: str | torch.device = "cpu", model: Any = None, tokenizer: Any = None):
        self.model_id = str(model_id)
        self.name = f"nli:{self.model_id}"
        if model is None or tokenizer is None:
            model, tokenizer = load_nli_model(self.model_id)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        labels = {str(v).lower(): int(k) for k, v in (model.config.id2label or {}).items()}
        missing = [x for x in ("entailment", "neutral", "contradiction") if x not in labels]
        if missing:
            raise ValueError(
                f"{self.model_id} is not an NLI model: its labels {sorted(labels)} lack {', '.join(missing)}"
            )
        self.entailment, self.neutral = labels["entailment"], labels["neutral"]

    @torch.no_grad()
    def probabilities(self, pairs: Pairs) -> torch.Tensor:
        """(pairs, labels) softmax probabilities, in the checkpoint's label order."""
        out = []
        for start in range(0, len(pairs), self.BATCH):
            chunk = pairs[start : start + self.BATCH]
            encoded = self.tokenizer(
                [p for p, _ in chunk],
                [h for _, h in chunk],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            ).to(self.model.device)
            out.append(torch.softmax(self.model(**encoded).logits.float(), dim=-1))
        return torch.cat(out)

    def support(self, pairs: Pairs, question: str = "") -> list[float]:
        if not pairs:
            return []
        probs = self.probabilities(pairs)
        return (probs[:, self.entailment] + 0.5 * probs[:, self.neutral]).tolist()


def load_nli_model(model_id: str) -> tuple[Any, Any]:
    """The checkpoint and its tokenizer, from a local directory or the Hugging Face hub (or its cache); a clear
    error when neither has it."""
    import os

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model_id.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model_id)):
        raise ValueError(f"cannot load the NLI model {model_id!r}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForSequenceClassification.from_pretrained(model_id)
    except OSError as e:
        raise ValueError(
            f"cannot load the NLI model {model_id!r}: no local copy, and the Hugging Face hub could not provide it "
            f"({str(e).splitlines()[0]}). Download it where there is network (`hf download {model_id}`, or "
            "copy the directory) and pass the directory, or leave --nli-model out to use the built-in similarity"
        ) from None
    return model, tokenizer


SIMILARITIES: dict[str, Callable[[Any, Any], Similarity]] = {
    "token-overlap": lambda model, tokenizer: TokenOverlap(),
    "jury-embedding": JuryEmbedding,
    "jury-judge": JuryJudge,
}
assert tuple(SIMILARITIES) == SIMILARITY_NAMES and DEFAULT_SIMILARITY in SIMILARITIES


def make_similarity(name: str, model: Any = None, tokenizer: Any = None) -> Similarity:
    """A similarity by its recorded name (``nli:<model>`` loads that checkpoint)."""
    if name.startswith("nli:"):
        return NLIModel(name.removeprefix("nli:"))
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}: one of {', '.join(SIMILARITIES)} or nli:<model>")
    return SIMILARITIES[name](model, tokenizer)
