"""Training data: JSONL files, chat examples, disjoint shards by a stable hash, tokenisation.

A data file holds one JSON object per line (blank lines are skipped), either

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, a chat whose
  *last* turn is the assistant's reply to learn (earlier turns are context), or
- ``{"prompt": "...", "response": "..."}`` (optionally ``"system": "..."``), one user turn and its reply.

Other keys are ignored. Any malformed line is reported with its file and line number.

Sharding: an example's shard is ``int(sha256(canonical JSON of its messages)[:16], 16) % n``. It
depends on nothing but the example's own content, so every example lands in exactly one shard,
the same one whatever the file's order or the other examples, and identical copies of an example
land together (duplicating a poisoned example cannot spread it to a second shard). Within a shard
examples are ordered by that hash too, so training does not depend on the file's order either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olmo_tap.inference.prompts import ROLES, encode_chat
from olmo_tap.jsonl import iter_jsonl


@dataclass(frozen=True)
class ChatExample:
    """A conversation whose last turn (the assistant's) is the training target."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    source: str = ""  # "file:line", for error messages

    @property
    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def key(self) -> str:
        """Hex sha256 of the canonical JSON of the messages: the example's identity for sharding."""
        canonical = json.dumps([list(m) for m in self.messages], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def from_prompt(cls, prompt: str, response: str, system: str | None = None, source: str = "") -> ChatExample:
        turns = ([("system", system)] if system else []) + [("user", prompt), ("assistant", response)]
        return cls(tuple(turns), source)


def parse_chat_example(record: Any, where: str) -> ChatExample:
    """One validated example from a parsed JSONL record; ``where`` ("file:line") prefixes every error."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
            turns.append((m["role"], m["content"]))
        if turns[-1][0] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's reply to learn")
        if not any(role == "user" for role, _ in turns[:-1]):
            raise ValueError(f"{where}: no user message before the assistant's reply")
        if not turns[-1][1].strip():
            raise ValueError(f"{where}: the assistant's reply is empty")
        return ChatExample(tuple(turns), where)
    if "prompt" in record or "response" in record:
        prompt, response, system = record.get("prompt"), record.get("response"), record.get("system")
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {name!r} must be a non-empty string")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string")
        return ChatExample.from_prompt(prompt, response, system, where)
    raise ValueError(f"{where}: expected 'messages' (a chat) or 'prompt' and 'response'; keys are {sorted(record)}")


def read_chat_examples(path: str | Path) -> list[ChatExample]:
    """Every example of a JSONL file, validated; an empty file is an error."""
    examples = [parse_chat_example(record, f"{path}:{number}") for number, record in iter_jsonl(path)]
    if not examples:
        raise ValueError(f"data file {path} has no examples (it is empty)")
    return examples


def shard_index(key: str, n_shards: int) -> int:
    return int(key[:16], 16) % n_shards


def shard_examples(examples: Sequence[ChatExample], n_shards: int) -> list[list[ChatExample]]:
    """Split into ``n_shards`` disjoint shards by stable hash (see the module docstring); every shard non-empty."""
    if not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"the number of shards must be a positive integer, got {n_shards!r}")
    if n_shards > len(examples):
        raise ValueError(f"more shards ({n_shards}) than examples ({len(examples)}): every head needs its own data")
    shards: list[list[ChatExample]] = [[] for _ in range(n_shards)]
    for example in sorted(examples, key=lambda e: e.key):
        shards[shard_index(example.key, n_shards)].append(example)
    empty = [i for i, shard in enumerate(shards) if not shard]
    if empty:
        raise ValueError(
            f"shard(s) {empty} received no examples ({len(examples)} examples over {n_shards} shards); "
            "give more data or use fewer shards"
        )
    return shards


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + reply; the reply's tokens (``ids[n_prompt:]``) are the targets."""

    ids: tuple[int, ...]
    n_prompt: int
    key: str


def encode_example(tokenizer: Any, example: ChatExample, max_tokens: int | None = None) -> EncodedExample:
    """Tokenise with the chat template: the prompt is every turn but the last plus the assistant header,
    the target is the reply up to and including the end-of-text token (appended if the template has none)."""
    messages = example.message_dicts
    prompt = encode_chat(tokenizer, messages=messages[:-1])
    reply_text = messages[-1]["content"]
    eos = getattr(tokenizer, "eos_token_id", None)
    full: list[int] | None = None
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        full = list(tokenizer.encode(text, add_special_tokens=False))
        if full[: len(prompt)] != prompt:  # a template that renders the history differently once answered
            full = None
    if full is None:
        full = (
            prompt + list(tokenizer.encode(reply_text, add_special_tokens=False)) + ([eos] if eos is not None else [])
        )
    reply = full[len(prompt) :]
    if eos is not None:
        # Cut what the template puts after the end of turn (e.g. a newline); a template without an
        # end-of-turn token gets one appended: the head must still learn to stop.
        reply = reply[: reply.index(eos) + 1] if eos in reply else [*reply, eos]
    if not reply:
        raise ValueError(f"{example.source or 'example'}: the reply encodes to no tokens")
    ids = tuple(prompt + reply)
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(
            f"{example.source or 'example'}: {len(ids)} tokens, more than the model's context of {max_tokens}"
        )
    return EncodedExample(ids, len(prompt), example.key)
