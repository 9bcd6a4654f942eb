"""OpenAI-format response bodies: a whole chat completion, stream chunks, Server-Sent Events lines."""

from __future__ import annotations

import json
from typing import Any

from olmo_tap.inference.poe import PoEOutput
from olmo_tap.serve.trust import OPENAI_FINISH


def usage(output: PoEOutput) -> dict[str, int]:
    prompt, completion = len(output.prompt_ids), len(output.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(
    completion_id: str, created: int, model_id: str, output: PoEOutput, trust: dict[str, Any]
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
                "logprobs": None,
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
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` None gives the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_counts is not None:
        body["usage"] = usage_counts
    if trust is not None:
        body["trust"] = trust
    return body


def sse(data: dict[str, Any] | str) -> str:
    """One Server-Sent Event carrying ``data`` (JSON unless it is already a string, like "[DONE]")."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"
