"""OpenAI-format response bodies: a whole chat completion, stream chunks, Server-Sent Events lines, logprobs.

Whole responses and stream lines share one encoding rule: JSON has no NaN or Infinity, so a non-finite float
goes out as a string ("inf", "nan", as ``olmo_tap.jsonl.json_safe`` writes it), never as an invalid literal.
A log-probability is the exception, in OpenAI's way: log(0) (a vetoed token) is written as -9999.0.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from fastapi.responses import JSONResponse as _JSONResponse

from olmo_tap.inference.poe import PoEOutput, TokenEvent
from olmo_tap.jsonl import json_safe
from olmo_tap.serve.trust import OPENAI_FINISH

# OpenAI's stand-in for the log-probability of a token with probability 0 (here: vetoed by the jury), which
# JSON cannot carry as -Infinity.
ZERO_PROB_LOGPROB = -9999.0


class JSONResponse(_JSONResponse):
    """FastAPI's JSONResponse, with non-finite floats written as strings instead of failing the request."""

    def render(self, content: Any) -> bytes:
        return super().render(json_safe(content))


def json_logprob(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else ZERO_PROB_LOGPROB


@functools.cache
def _byte_level_decoder() -> dict[str, int] | None:
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token's text and its bytes. A token holding part of a character decodes to U+FFFD; its own bytes
    (what OpenAI's ``bytes`` is for) come from the vocabulary entry then: GPT-2-style byte-level pieces, or
    SentencePiece's <0xNN> byte tokens. Otherwise the text's UTF-8."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text and hasattr(tokenizer, "convert_ids_to_tokens"):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        byte_token = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece) if isinstance(piece, str) else None
        if byte_token:
            return text, [int(byte_token[1], 16)]
        decoder = _byte_level_decoder()
        if isinstance(piece, str) and piece and decoder is not None and all(c in decoder for c in piece):
            return text, [decoder[c] for c in piece]
    return text, list(text.encode("utf-8"))


def logprobs_entry(tokenizer: Any, event: TokenEvent) -> dict[str, Any]:
    """One token of OpenAI's ``logprobs.content``: its text, log-probability, bytes and the top alternatives,
    all under the distribution the token was decided from (the jury's after the veto)."""

    def described(token_id: int, logprob: float | None) -> dict[str, Any]:
        text, raw = token_bytes(tokenizer, token_id)
        return {"token": text, "logprob": json_logprob(logprob), "bytes": raw}

    return {
        **described(event.token_id, event.logprob),
        "top_logprobs": [described(token_id, logprob) for token_id, logprob in event.top_logprobs or []],
    }


def choice_logprobs(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if content is None else {"content": content, "refusal": None}


def usage(output: PoEOutput) -> dict[str, int]:
    prompt, completion = len(output.prompt_ids), len(output.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(
    completion_id: str,
    created: int,
    model_id: str,
    output: PoEOutput,
    trust: dict[str, Any],
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": output.text, "refusal": None},
                "logprobs": choice_logprobs(logprobs),
                "finish_reason": OPENAI_FINISH.get(output.finish_reason, "stop"),
            }
        ],
        "usage": usage(output),
        "trust": trust,
    }


def chunk_body(
    completion_id: str,
    created: int,
    model_id: str,
    delta: dict[str, Any] | None,
    *,
    finish_reason: str | None = None,
    trust: dict[str, Any] | None = None,
    usage_counts: dict[str, int] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` None gives the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": choice_logprobs(logprobs), "finish_reason": finish_reason}],
    }
    if usage_counts is not None:
        body["usage"] = usage_counts
    if trust is not None:
        body["trust"] = trust
    return body


def sse(data: dict[str, Any] | str) -> str:
    """One Server-Sent Event carrying ``data`` (JSON unless it is already a string, like "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(json_safe(data), separators=(",", ":"), allow_nan=False)
    return f"data: {text}\n\n"
