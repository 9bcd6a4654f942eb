"""Turning a prompt or a conversation into token ids with the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


def not_unicode(text: str) -> str | None:
    """Why ``text`` cannot be tokenized, or None where it is Unicode text: a byte that was not UTF-8 (Python keeps
    one of a command line or a file as a surrogate escape, U+DC80-U+DCFF) or a lone surrogate (half of a UTF-16
    pair, which JSON's escapes can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"byte 0x{code - 0xDC00:02X} at character {e.start} is not UTF-8"
        return f"a lone surrogate (U+{code:04X}) at character {e.start}"
    return None


def normalise_messages(
    prompt_text: str | None = None, messages: list[dict[str, Any]] | None = None
) -> list[dict[str, str]]:
    """``messages`` if given (validated), else one user turn of ``prompt_text``."""
    if messages:
        for i, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise ValueError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")
            why = not_unicode(message["content"])
            if why is not None:
                raise ValueError(f"messages[{i}]'s content cannot be tokenized: {why}")
        if not any(m["content"].strip() for m in messages):
            raise ValueError("messages are all empty")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if prompt_text is None or not str(prompt_text).strip():
        raise ValueError("the prompt is empty: give prompt text or a non-empty list of messages")
    why = not_unicode(str(prompt_text))
    if why is not None:
        raise ValueError(f"the prompt cannot be tokenized: {why}")
    return [{"role": "user", "content": str(prompt_text)}]


class ChatTemplateError(ValueError):
    """The model's chat template refused the conversation (many do: roles that must alternate, no system turn)."""


def encode_chat(
    tokenizer: Any, prompt_text: str | None = None, messages: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of the conversation followed by the assistant's generation prompt."""
    conversation = normalise_messages(prompt_text, messages)
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError  # transformers renders templates with jinja2

        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # the template's raise_exception, or an error in the template itself
            raise ChatTemplateError(f"the model's chat template refused this conversation: {e}") from None
        return list(tokenizer.encode(text, add_special_tokens=False))
    # No template (e.g. a base model): plain concatenation of the turns.
    return list(tokenizer.encode("\n".join(m["content"] for m in conversation)))


def uncertainty_prompt(question: str, answer: str) -> str:
    """The second-pass prompt the uncertainty head scores: the question, the jury's answer, and the task of
    replying A (correct) or B (wrong). Training and PoE's scoring both build it here, so they cannot drift."""
    return f"{question} Answer: {answer}\nTask: Reply A (correct) or B (wrong): "


def stop_token_ids(tokenizer: Any, extra: int | list[int] | None = None) -> set[int]:
    """Ids that end a response: the tokenizer's EOS plus the model's (``extra``)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids
