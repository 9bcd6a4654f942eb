"""Forgeries of a transcript, as a forger would make them: the audit experiment's attacks and the tests'.

Each function returns a new transcript. The forger keeps the easy derived fields in step with the edited
ids (``restamp``: output ids, text pieces, settings copy and digest), so what catches it is the replay, not
a stale field. Where the jury's own signals would have to change too (entropies, radii), a real forger
would need the model to fake them; the audit's field check catches those that are left stale.
"""

from __future__ import annotations

import copy
import random
from typing import Any

from olmo_tap.inference.text import TextStream
from olmo_tap.inference.transcript import content_digest


def restamp(transcript: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Bring the fields anyone can recompute without the model in line with the claim (ids, settings)."""
    output = transcript.setdefault("output", {})
    output["token_ids"] = list(transcript["token_ids"])
    output["prompt_ids"] = list(transcript["prompt_ids"])
    output["settings"] = copy.deepcopy(transcript["settings"])
    stream = TextStream(tokenizer)
    parts = [tokenizer.decode(transcript["prompt_ids"], skip_special_tokens=True)]
    parts += [stream.push(t) for t in transcript["token_ids"]]
    tail = stream.flush()
    if tail and len(parts) > 1:
        parts[-1] += tail
    output["output_parts"] = parts
    output["text"] = "".join(parts[1:])
    n = len(transcript["token_ids"])
    for name in ("token_entropies", "stability_radii", "stability_margins"):
        values = list(output.get(name, []))[:n]
        output[name] = values + [values[-1] if values else 0] * (n - len(values))
    keep = [i for i, part in enumerate(output.get("resampled_idxs", [])) if part <= n]
    for name in ("resampled_idxs", "original_tokens", "original_token_ids", "validity_radii", "suppression_scores"):
        values = output.get(name, [])
        output[name] = [values[i] for i in keep if i < len(values)]
    transcript["digest"] = content_digest(transcript)
    return transcript


def substitute(transcript: dict[str, Any], tokenizer: Any, index: int, token: int) -> dict[str, Any]:
    forged = copy.deepcopy(transcript)
    forged["token_ids"][index] = token
    return restamp(forged, tokenizer)


def insert(transcript: dict[str, Any], tokenizer: Any, index: int, tokens: list[int]) -> dict[str, Any]:
    forged = copy.deepcopy(transcript)
    forged["token_ids"][index:index] = tokens
    _shift_resampled(forged, index, len(tokens))
    return restamp(forged, tokenizer)


def delete(transcript: dict[str, Any], tokenizer: Any, index: int) -> dict[str, Any]:
    forged = copy.deepcopy(transcript)
    del forged["token_ids"][index]
    _shift_resampled(forged, index + 1, -1)
    return restamp(forged, tokenizer)


def truncate(transcript: dict[str, Any], tokenizer: Any, keep: int) -> dict[str, Any]:
    forged = copy.deepcopy(transcript)
    forged["token_ids"] = forged["token_ids"][:keep]
    return restamp(forged, tokenizer)


def change_prompt(transcript: dict[str, Any], tokenizer: Any, index: int, token: int) -> dict[str, Any]:
    forged = copy.deepcopy(transcript)
    forged["prompt_ids"][index] = token
    return restamp(forged, tokenizer)


def change_setting(transcript: dict[str, Any], tokenizer: Any, name: str, value: Any) -> dict[str, Any]:
    forged = copy.deepcopy(transcript)
    forged["settings"][name] = value
    if name == "draft_head":
        forged["output"]["draft_head"] = value
        heads = range(forged["settings"]["n_llm_heads"])
        forged["output"]["verifier_heads"] = [h for h in heads if h != value]
    return restamp(forged, tokenizer)


def change_output(transcript: dict[str, Any], name: str, index: int | None, value: Any) -> dict[str, Any]:
    """A derived field edited (a signal, a count, the text a reader sees); the claim and digest untouched."""
    forged = copy.deepcopy(transcript)
    if index is None:
        forged["output"][name] = value
    else:
        forged["output"][name][index] = value
    return forged


def random_other_token(rng: random.Random, vocab: int, token: int) -> int:
    other = rng.randrange(vocab - 1)
    return other + 1 if other >= token else other


def _shift_resampled(transcript: dict[str, Any], first_index: int, by: int) -> None:
    """Keep the rejected drafts on the tokens they belong to after tokens were inserted or deleted."""
    output = transcript.get("output", {})
    parts = output.get("resampled_idxs", [])
    output["resampled_idxs"] = [p + by if p - 1 >= first_index else p for p in parts]
