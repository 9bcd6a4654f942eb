"""KLE's sampled answers: their seeds, their settings, and the certainty (with its record) they give.

The N answers are the jury's, to the same messages, decoded with the answer's own settings except:

- ``seed``: the i-th is the top 32 bits of ``stream_seed(answer seed, i, "certainty-sample")``, so the score is
  replayable and an audit can tell that nobody picked the samples;
- ``temperature``: ``SAMPLE_TEMPERATURE`` = 1.0, the model's own distribution, whatever the answer used (a
  greedy answer has no spread to measure; a low temperature would make any jury look certain);
- no multiple-choice scoring (``mcq`` off).

They run batched (``PoE.generate_many``; the service puts them in its batch beside the answer).
``kle_record`` is what a response and its transcript carry: the samples (seed, draft head, token ids), the
similarity's name, the matrix, the entropy and the certainty; ``olmo-tap audit`` replays each sample and
recomputes the rest (``olmo_tap.verify.certainty_audit``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from olmo_tap.certainty.claims import claim_ledger
from olmo_tap.certainty.kle import KERNEL_T, N_SAMPLES, kernel_language_entropy, kle_certainty
from olmo_tap.certainty.similarity import Similarity, similarity_matrix
from olmo_tap.inference.poe import PoE, PoEOutput
from olmo_tap.inference.sampling import Purpose, stream_seed
from olmo_tap.inference.settings import DecodeSettings

SAMPLE_TEMPERATURE = 1.0
METHOD = "kle"
# Settings a sample may not change from its answer's: the same jury, prompt budget and vocabulary.
SHARED_SETTINGS = (
    "mode", "gamma", "beta", "veto_threshold", "n_llm_heads", "max_new_tokens", "ignore_eos", "vocab_limit",
    "stop_ids", "n_heads", "heads_depth", "dtype", "quantization", "quant_kernel", "linear",
)  # fmt: skip


def sample_seeds(seed: int, n: int = N_SAMPLES) -> list[int]:
    """The seeds of an answer's N samples, derived from its own."""
    if n < 2:
        raise ValueError(f"KLE needs at least 2 sampled answers, got {n}")
    # 32 bits, like the seeds the service draws: JSON readers that hold numbers as doubles (a browser's) keep them
    return [stream_seed(seed, i, Purpose.CERTAINTY_SAMPLE) >> 31 for i in range(n)]


def sample_settings(settings: DecodeSettings) -> DecodeSettings:
    """The samples' decoding settings (each gets its seed from ``sample_seeds``)."""
    return settings.replace(temperature=SAMPLE_TEMPERATURE, seed=None, top_logprobs=None, compile=False)


def sample_answers(
    model: Any, tokenizer: Any, settings: DecodeSettings, messages: list[dict[str, str]], seed: int, n: int = N_SAMPLES
) -> list[PoEOutput]:
    """The N samples of an answer decoded with ``settings`` and seed ``seed``, in one batch."""
    decoder = PoE.from_settings(model, tokenizer, sample_settings(settings))
    return decoder.generate_many([messages] * n, max_batch=n, seeds=sample_seeds(seed, n))


def kle_record(samples: list[PoEOutput], similarity: Similarity, question: str, t: float = KERNEL_T) -> dict[str, Any]:
    """The certainty of an answer from its samples: ``{"method": "kle", "value", "entropy", "similarity",
    "question", "kernel_t", "temperature", "n_samples", "matrix", "samples": [{"seed", "draft_head",
    "token_ids", "text"}], "sample_settings"}``. ``question``: the user's message the similarity read (the
    jury's similarities read it; an audit checks it is in the prompt)."""
    texts = [s.text for s in samples]
    # Rounded before use, so the recorded matrix is exactly what the value comes from (an audit recomputes it).
    matrix = np.round(similarity_matrix(similarity, texts, question), 6)
    entropy = kernel_language_entropy(matrix, t)
    common = {k: v for k, v in samples[0].settings.items() if k not in ("seed", "draft_head", "head")}
    return {
        "method": METHOD,
        "value": kle_certainty(entropy, len(samples)),
        "entropy": entropy,
        "similarity": similarity.name,
        "question": question,
        "kernel_t": t,
        "temperature": SAMPLE_TEMPERATURE,
        "n_samples": len(samples),
        "matrix": matrix.tolist(),
        "samples": [
            {
                "seed": s.settings["seed"],
                "draft_head": s.draft_head,
                "token_ids": s.token_ids,
                # the jury's path (which tokens replaced a rejected draft, and the drafts): what the audit replays
                "resampled_idxs": s.resampled_idxs,
                "original_token_ids": s.original_token_ids,
                "text": s.text,
            }
            for s in samples
        ],
        "sample_settings": common,
    }


def kle_with_claims(answer: str, samples: list[PoEOutput], similarity: Similarity, question: str) -> dict[str, Any]:
    """``kle_record`` and the answer's claim ledger against the samples (``olmo_tap.certainty.claims``)."""
    ledger = claim_ledger(answer, [s.text for s in samples], lambda pairs: similarity.support(pairs, question))
    return {**kle_record(samples, similarity, question), **ledger}
